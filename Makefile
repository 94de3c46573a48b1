# cdmoe - Condense, Don't Just Prune: MoE condensation tools in C (and CUDA).
#
#   make            build every tool into bin/
#   make test       build and run the whole test suite (installs deps first)
#   make demo       run the default end-to-end job (installs deps first)
#   make bench      benchmarks (ratios against peers measured in the same run)
#   make deps       install the Debian packages we build against (idempotent)
#   make SAN=1 test AddressSanitizer + UndefinedBehaviorSanitizer build
#   make CUDA=0|1   force the CUDA backend off/on (default: on when nvcc exists)
#   make install PREFIX=/usr/local
#
# Sources are found by pattern, so new files need no Makefile edit:
#   lib/*.c kernels/*.c          -> build/libcdmoe.a
#   kernels/cuda/*.cu            -> build/libcdmoe.a (when CUDA=1)
#   tools/moe-*.c                -> bin/moe-*
#   tests/unit/test_*.c          -> build/tests/test_* (cmocka)

PREFIX ?= /usr/local
CC ?= gcc
NVCC ?= nvcc
BUILD := build
BIN := bin

PKGS := msgpack libzstd jansson oniguruma libutf8proc openblas
PKG_CFLAGS := $(shell pkg-config --cflags $(PKGS) 2>/dev/null)
PKG_LIBS := $(shell pkg-config --libs $(PKGS) 2>/dev/null)

OPT ?= -O2
CFLAGS ?= $(OPT) -g
CFLAGS += -std=gnu11 -Wall -Wextra -fopenmp -fno-fast-math -MMD -MP -Ilib -Ikernels $(PKG_CFLAGS)
LDLIBS += $(PKG_LIBS) -lm -lpthread
LDFLAGS += -fopenmp
ifeq ($(WERROR),1)
CFLAGS += -Werror
endif
ifeq ($(SAN),1)
BUILD := build-san
BIN := build-san/bin
CFLAGS += -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined
LDFLAGS += -fsanitize=address,undefined
endif

# CUDA: on when nvcc is found, unless CUDA=0.
ifeq ($(origin CUDA),undefined)
CUDA := $(if $(shell command -v $(NVCC) 2>/dev/null),1,0)
endif
CUDA_HOME ?= $(patsubst %/bin/nvcc,%,$(shell command -v $(NVCC) 2>/dev/null))
CUDA_ARCH ?= -gencode arch=compute_90,code=sm_90 -gencode arch=compute_80,code=sm_80
NVCCFLAGS ?= -O2 $(CUDA_ARCH) -Xcompiler -fPIC,-Wall -Ilib -Ikernels -MMD -MP
ifeq ($(CUDA),1)
CFLAGS += -DMOE_HAVE_CUDA=1 -I$(CUDA_HOME)/include
LDLIBS += -L$(CUDA_HOME)/lib64 -Wl,-rpath,$(CUDA_HOME)/lib64 -lcublas -lcudart -lstdc++
# kernels/cpu.c refers to moe_backend_cuda weakly, which does not pull an
# archive member: force the CUDA backend into every binary.
LDFLAGS += -Wl,--undefined=moe_backend_cuda
CU_SRC := $(wildcard kernels/cuda/*.cu)
else
CU_SRC :=
endif

LIB_SRC := $(wildcard lib/*.c) $(wildcard kernels/*.c)
LIB_OBJ := $(LIB_SRC:%.c=$(BUILD)/%.o) $(CU_SRC:%.cu=$(BUILD)/%.cu.o)
LIBA := $(BUILD)/libcdmoe.a
TOOL_SRC := $(wildcard tools/moe-*.c)
TOOLS := $(TOOL_SRC:tools/%.c=$(BIN)/%)
TEST_SRC := $(wildcard tests/unit/test_*.c)
TESTS := $(TEST_SRC:tests/unit/%.c=$(BUILD)/tests/%)
GPU_TEST_SRC := $(wildcard tests/unit/gpu_*.c)
GPU_TESTS := $(GPU_TEST_SRC:tests/unit/%.c=$(BUILD)/tests/%)
GPU_BENCH := $(patsubst bench/%.c,$(BUILD)/bench/%,$(wildcard bench/gpu_*.c))
MAN1 := $(wildcard man/man1/*.1)
MAN5 := $(wildcard man/man5/*.5)

.PHONY: all test test-unit test-shell test-gpu bench demo deps install clean check-deps
all: $(TOOLS)

$(BUILD)/%.o: %.c
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -c $< -o $@

$(BUILD)/%.cu.o: %.cu
	@mkdir -p $(dir $@)
	$(NVCC) $(NVCCFLAGS) -c $< -o $@

$(LIBA): $(LIB_OBJ)
	@rm -f $@
	ar rcs $@ $^

$(BIN)/%: $(BUILD)/tools/%.o $(LIBA)
	@mkdir -p $(dir $@)
	$(CC) $(LDFLAGS) $< $(LIBA) $(LDLIBS) -o $@

$(BUILD)/tests/%: $(BUILD)/tests/unit/%.o $(LIBA)
	@mkdir -p $(dir $@)
	$(CC) $(LDFLAGS) $< $(LIBA) $(LDLIBS) -lcmocka -o $@

# test_model_device hands the model an emulated device by wrapping moe_backend_get
$(BUILD)/tests/test_model_device: override LDFLAGS += -Wl,--wrap=moe_backend_get

# Benchmark drivers bench/*.c, built on demand by the bench scripts (the GPU
# ones, bench/gpu_*.c, with all-tests so that CI compiles them; run by
# bench/gpu-check.sh).
$(BUILD)/bench/%: $(BUILD)/bench/%.o $(LIBA)
	$(CC) $(LDFLAGS) $< $(LIBA) $(LDLIBS) -o $@

# Dependencies: Debian packages, installed only when missing.
DEB_PKGS := build-essential pkg-config libmsgpack-dev libzstd-dev zstd libjansson-dev \
	libonig-dev libutf8proc-dev libopenblas-dev libcmocka-dev python3-msgpack python3-zstandard python3-numpy
deps:
	@missing=$$(for p in $(DEB_PKGS); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null \
		| grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "deps: installing" $$missing; \
		SUDO=; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
		$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
		$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

test: deps
	$(MAKE) all-tests
	BIN=$(BIN) BUILD=$(BUILD) sh tests/run.sh

.PHONY: all-tests
all-tests: $(TOOLS) $(TESTS) $(GPU_TESTS) $(GPU_BENCH)

test-gpu: all-tests
	BIN=$(BIN) BUILD=$(BUILD) sh tests/run.sh --gpu

bench: deps all
	BIN=$(BIN) BUILD=$(BUILD) sh bench/run.sh

demo: deps all
	sh pipelines/cd-moe.sh

install: all
	install -d $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(PREFIX)/share/man/man1 $(DESTDIR)$(PREFIX)/share/man/man5
	install -m 755 $(TOOLS) $(DESTDIR)$(PREFIX)/bin
	$(if $(MAN1),install -m 644 $(MAN1) $(DESTDIR)$(PREFIX)/share/man/man1)
	$(if $(MAN5),install -m 644 $(MAN5) $(DESTDIR)$(PREFIX)/share/man/man5)

clean:
	rm -rf build build-san bin

.SECONDARY:
-include $(shell find $(BUILD) -name '*.d' 2>/dev/null)
