# cdmoe - Condense, Don't Just Prune: MoE condensation tools in C (and CUDA).
#
#   make            build every tool into bin/
#   make test       build and run the whole test suite (installs deps first)
#   make demo       CD-MoE vs the baselines on the trained default model (installs deps first;
#                   DEMO_ARGS=--tune also tunes every checkpoint)
#   make bench      benchmarks (ratios against peers measured in the same run)
#   make deps       install the Debian packages we build against (idempotent)
#   make test-cuda-emu  the GPU parity tests against the CUDA emulator (CPU)
#   make SAN=1 test AddressSanitizer + UndefinedBehaviorSanitizer build
#   make fuzz [FUZZ_SECONDS=N]  each libFuzzer target (tests/fuzz) N seconds (clang)
#   make test-fresh the README's commands on a fresh Debian root (root, debootstrap)
#   make CUDA=0|1   force the CUDA backend off/on (default: on when nvcc exists)
#   make install PREFIX=/usr/local
#
# Sources are found by pattern, so new files need no Makefile edit:
#   lib/*.c lib/model/*.c lib/tokenizer/*.c kernels/*.c -> build/libcdmoe.a
#   kernels/cuda/*.cu            -> build/libcdmoe_cuda.so (plugin, when CUDA=1)
#   tools/moe-*.c                -> bin/moe-*
#   tests/unit/test_*.c          -> build/tests/test_* (cmocka)

PREFIX ?= /usr/local
CC ?= gcc
NVCC ?= nvcc
BUILD := build
BIN := bin

# Build flags come from pkg-config when the Makefile is read, so on a fresh
# machine they can only be right after `make deps` has installed the packages:
# the entry points that install them first (test, demo, bench, ...) run deps
# and then make themselves again in a new make that reads the flags afresh
# (see "Entry points" below).  A build without the packages stops here with
# the remedy instead of failing to link.
PKGS := msgpack libzstd jansson oniguruma libutf8proc openblas
PKG_OK := $(shell pkg-config --exists $(PKGS) 2>/dev/null && echo 1)
PKG_CFLAGS := $(shell pkg-config --cflags $(PKGS) 2>/dev/null)
PKG_LIBS := $(shell pkg-config --libs $(PKGS) 2>/dev/null)

OPT ?= -O2
CFLAGS ?= $(OPT) -g
CFLAGS += -std=gnu11 -Wall -Wextra -fopenmp -fno-fast-math -MMD -MP -Ilib -Ilib/tokenizer -Ikernels $(PKG_CFLAGS)
LDLIBS += $(PKG_LIBS) -lm -lpthread
LDFLAGS += -fopenmp
ifeq ($(WERROR),1)
CFLAGS += -Werror
endif
ifeq ($(FUZZ),1)
# `make fuzz` builds here (clang; the library instrumented for libFuzzer)
BUILD := build-fuzz
BIN := build-fuzz/bin
CFLAGS += -fsanitize=fuzzer-no-link,address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined
LDFLAGS += -fsanitize=fuzzer,address,undefined
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
NVCCFLAGS ?= -O2 $(CUDA_ARCH) -Xcompiler -fPIC,-Wall,-fvisibility=hidden -Ilib -Ikernels -MMD -MP
ifeq ($(CUDA),1)
# The CUDA backend is a plugin, $(BUILD)/libcdmoe_cuda.so (copied beside the
# tools, installed in PREFIX/lib/cdmoe), that kernels/select.c dlopen()s only
# when CUDA is used: the tools link no CUDA library (cuBLAS alone costs
# ~210 MB of resident memory at start).  See kernels/cuda_plugin.h.
CFLAGS += -DMOE_HAVE_CUDA=1
LDLIBS += -ldl
CU_SRC := $(wildcard kernels/cuda/*.cu)
CUDA_PLUGIN := $(BUILD)/libcdmoe_cuda.so
CUDA_PLUGIN_BIN := $(BIN)/libcdmoe_cuda.so
else ifeq ($(CUDA),emu)
# tests only: the plugin loader, with the CUDA emulator as the plugin (below)
CFLAGS += -DMOE_HAVE_CUDA=1
LDLIBS += -ldl
CU_SRC :=
CUDA_PLUGIN := $(BUILD)/libcdmoe_cuda.so
CUDA_PLUGIN_BIN := $(BIN)/libcdmoe_cuda.so
else
CU_SRC :=
CUDA_PLUGIN :=
CUDA_PLUGIN_BIN :=
endif

LIB_SRC := $(wildcard lib/*.c) $(wildcard lib/model/*.c) $(wildcard lib/tokenizer/*.c) $(wildcard kernels/*.c)
LIB_OBJ := $(LIB_SRC:%.c=$(BUILD)/%.o)
# hf/modeling_cdmoe.py, the Hugging Face remote code moe-condense writes into
# its checkpoints, is compiled into the library (no file to find at run time);
# od is in coreutils, where xxd is not.
HF_MODELING := hf/modeling_cdmoe.py
HF_MODELING_C := $(BUILD)/gen/hf_modeling.c
LIB_OBJ += $(BUILD)/gen/hf_modeling.o
CU_OBJ := $(CU_SRC:%.cu=$(BUILD)/%.cu.o)
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

.PHONY: all test test-unit test-shell test-gpu bench demo deps install clean
all: $(TOOLS) $(CUDA_PLUGIN_BIN)

# Entry points that install the Debian packages first.  `make test` on a
# machine without them runs deps, then `make DEPS_DONE=1 test`: a second make
# whose pkg-config flags see the installed packages (in one make they were
# computed before deps ran, and the link failed on a fresh machine).
DEPS_FIRST := test test-gpu test-cuda-emu bench demo
ifneq ($(DEPS_DONE),1)
$(DEPS_FIRST): deps
	+@$(MAKE) --no-print-directory DEPS_DONE=1 $@
endif
# Any other goal that compiles needs the packages now.
BUILD_GOALS := $(filter-out deps fuzz-deps clean test-fresh $(if $(filter 1,$(DEPS_DONE)),,$(DEPS_FIRST) fuzz),$(or $(MAKECMDGOALS),all))
ifeq ($(PKG_OK)$(BUILD_GOALS),$(BUILD_GOALS))
ifneq ($(BUILD_GOALS),)
$(error build dependencies missing (pkg-config does not find: $(PKGS)); run `make deps` first (`make test` and `make demo` run it themselves))
endif
endif

$(BUILD)/%.o: %.c
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -c $< -o $@

$(BUILD)/%.cu.o: %.cu
	@mkdir -p $(dir $@)
	$(NVCC) $(NVCCFLAGS) -c $< -o $@

ifeq ($(CUDA),1)
$(CUDA_PLUGIN): $(CU_OBJ)
	$(NVCC) -shared $(CUDA_ARCH) $^ -o $@ -cudart shared -lcublas -Xlinker -rpath,$(CUDA_HOME)/lib64
endif

$(CUDA_PLUGIN_BIN): $(CUDA_PLUGIN)
	@mkdir -p $(dir $@)
	cp $< $@

$(HF_MODELING_C): $(HF_MODELING)
	@mkdir -p $(dir $@)
	{ echo '/* generated from $< by make: do not edit */'; \
	  echo '#include "hf_modeling.h"'; \
	  echo 'const char moe_hf_modeling_py[] = {'; \
	  od -An -v -tx1 $< | sed 's/ *\([0-9a-f][0-9a-f]\)/0x\1,/g'; \
	  echo '0};'; } >$@.tmp && mv $@.tmp $@

$(BUILD)/gen/hf_modeling.o: $(HF_MODELING_C)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -c $< -o $@

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

# The CUDA emulator (tests/cudaemu, see emu.cpp): kernels/cuda/*.cu compiled
# by g++ as host code into a plugin that runs on the CPU, so that the GPU
# parity tests check the real backend source where no GPU is (no nvcc needed).
# `make test-cuda-emu` runs the GPU tests against it (tests/run.sh --emu);
# `make test` runs them too, on fewer models (CUDA_EMU= names the plugin).
# The library needs its plugin loader: CUDA=1, or CUDA=emu where nvcc is
# absent (the emulator then stands in as libcdmoe_cuda.so: tests only, never
# installed; test-cuda-emu in a CUDA=0 build makes one in build-emu/, and
# `make test` there skips the emulated GPU tests, saying why).
CXX ?= g++
EMU_DIR := $(BUILD)/emu
EMU_PLUGIN := $(EMU_DIR)/libcdmoe_cuda_emu.so
EMU_CU := $(wildcard kernels/cuda/*.cu)
EMU_OBJ := $(EMU_CU:kernels/cuda/%.cu=$(EMU_DIR)/%.o) $(EMU_DIR)/emu.o
EMU_CXXFLAGS := -O2 -g -std=gnu++17 -fPIC -fvisibility=hidden -ffp-contract=off -fno-fast-math \
	-fopenmp -Wall -Wextra -Wno-unused-function -Itests/cudaemu -Ilib -Ikernels -MMD -MP
ifeq ($(WERROR),1)
EMU_CXXFLAGS += -Werror
endif
HAVE_CXX := $(if $(shell command -v $(CXX) 2>/dev/null),1,0)

$(EMU_DIR)/%.cpp: kernels/cuda/%.cu tests/cudaemu/translate.pl
	@mkdir -p $(dir $@)
	perl tests/cudaemu/translate.pl $< >$@.tmp && mv $@.tmp $@
$(EMU_DIR)/%.o: $(EMU_DIR)/%.cpp
	$(CXX) $(EMU_CXXFLAGS) -c $< -o $@
$(EMU_DIR)/emu.o: tests/cudaemu/emu.cpp
	@mkdir -p $(dir $@)
	$(CXX) $(EMU_CXXFLAGS) -c $< -o $@
$(EMU_PLUGIN): $(EMU_OBJ)
	$(CXX) -shared -fopenmp $^ -o $@ -lm -lpthread
# the emulator's own checks (tests/cudaemu/selftest.cu)
$(EMU_DIR)/selftest.cpp: tests/cudaemu/selftest.cu tests/cudaemu/translate.pl
	@mkdir -p $(dir $@)
	perl tests/cudaemu/translate.pl $< >$@.tmp && mv $@.tmp $@
$(EMU_DIR)/selftest: $(EMU_DIR)/selftest.o $(EMU_DIR)/emu.o
	$(CXX) -fopenmp $^ -o $@ -lm -lpthread

.PHONY: cuda-emu test-cuda-emu
ifeq ($(HAVE_CXX),1)
cuda-emu: $(EMU_PLUGIN) $(EMU_DIR)/selftest
EMU_ENV := CUDA_EMU=$(EMU_PLUGIN)
else
cuda-emu:
	@echo "SKIP: cuda-emu: no C++ compiler ($(CXX)): the emulated GPU tests will not run"
EMU_ENV := CUDA_EMU=
endif
ifeq ($(CUDA),emu)
$(CUDA_PLUGIN): $(EMU_PLUGIN)
	cp $< $@
endif
ifeq ($(DEPS_DONE),1)
ifeq ($(CUDA),0)
# no plugin loader in this build: the emulated tests need a CUDA=emu build
test-cuda-emu:
	$(MAKE) CUDA=emu BUILD=build-emu BIN=build-emu/bin test-cuda-emu
else
test-cuda-emu: all-tests cuda-emu
	BIN=$(BIN) BUILD=$(BUILD) $(EMU_ENV) sh tests/run.sh --emu
endif
endif # DEPS_DONE

# Benchmark drivers bench/*.c, built on demand by the bench scripts (the GPU
# ones, bench/gpu_*.c, with all-tests so that CI compiles them; run by
# bench/gpu-check.sh).
$(BUILD)/bench/%: $(BUILD)/bench/%.o $(LIBA)
	$(CC) $(LDFLAGS) $< $(LIBA) $(LDLIBS) -o $@

# Dependencies: Debian packages, installed only when missing.
DEB_PKGS := build-essential pkg-config libmsgpack-dev libzstd-dev zstd libjansson-dev \
	libonig-dev libutf8proc-dev libopenblas-dev libcmocka-dev python3-msgpack python3-zstandard python3-numpy
# `make fuzz` only: clang with its libFuzzer/sanitizer runtimes and OpenMP
FUZZ_PKGS := clang libclang-rt-14-dev libomp-dev
# $(call apt_install,PACKAGES): apt-get install those not installed yet
define apt_install
	@missing=$$(for p in $(1); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null \
		| grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "deps: installing" $$missing; \
		SUDO=; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
		$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
		$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi
endef
deps:
	$(call apt_install,$(DEB_PKGS))
fuzz-deps: deps
	$(call apt_install,$(FUZZ_PKGS))

# Fuzzing (tests/fuzz; see tests/fuzz/fuzz.h).  Each tests/fuzz/fuzz_NAME.c
# is one libFuzzer target.  all-tests links each with tests/fuzz/replay.c
# instead (any compiler), so that `make test` replays the seeds and the
# committed crash inputs (tests/fuzz/regressions/NAME/) through the same
# function; `make fuzz` installs clang (fuzz-deps), builds the targets with
# -fsanitize=fuzzer,address,undefined in build-fuzz/ and runs each for
# FUZZ_SECONDS seconds from seeds made from the test fixtures, printing the
# executions per target (tests/fuzz/run.sh).
FUZZ_SECONDS ?= 60
FUZZ_NAMES := $(patsubst tests/fuzz/fuzz_%.c,%,$(wildcard tests/fuzz/fuzz_*.c))
FUZZ_REPLAY := $(FUZZ_NAMES:%=$(BUILD)/fuzz/replay-%)
FUZZ_BINS := $(FUZZ_NAMES:%=$(BUILD)/fuzz/bin/%)
$(BUILD)/tests/fuzz/%.o: CFLAGS += -DFUZZ_SRCDIR='"$(CURDIR)"'
$(BUILD)/fuzz/replay-%: $(BUILD)/tests/fuzz/fuzz_%.o $(BUILD)/tests/fuzz/replay.o $(LIBA)
	@mkdir -p $(dir $@)
	$(CC) $(LDFLAGS) $^ $(LDLIBS) -o $@
$(BUILD)/fuzz/bin/%: $(BUILD)/tests/fuzz/fuzz_%.o $(LIBA)
	@mkdir -p $(dir $@)
	$(CC) $(LDFLAGS) $^ $(LDLIBS) -o $@
.PHONY: fuzz fuzz-deps fuzz-run test-fresh
ifneq ($(DEPS_DONE),1)
fuzz: fuzz-deps
	+@$(MAKE) --no-print-directory DEPS_DONE=1 fuzz
else
fuzz:
	+@$(MAKE) --no-print-directory FUZZ=1 CC=clang OPT=-O1 CUDA=0 fuzz-run
endif
fuzz-run: $(FUZZ_BINS)
	sh tests/fuzz/run.sh $(BUILD) $(FUZZ_SECONDS) $(FUZZ_NAMES)

# The README's commands on a fresh Debian root (opt-in, as root; minutes).
test-fresh:
	sh tests/fresh-machine.sh

.PHONY: all-tests
all-tests: $(TOOLS) $(CUDA_PLUGIN_BIN) $(CUDA_PLUGIN) $(TESTS) $(GPU_TESTS) $(GPU_BENCH) $(FUZZ_REPLAY)

ifeq ($(DEPS_DONE),1) # the entry points proper (see DEPS_FIRST)
test: all-tests cuda-emu
	BIN=$(BIN) BUILD=$(BUILD) $(EMU_ENV) sh tests/run.sh


test-gpu: all-tests
	BIN=$(BIN) BUILD=$(BUILD) sh tests/run.sh --gpu

bench: all
	BIN=$(BIN) BUILD=$(BUILD) sh bench/run.sh

demo: all
	BIN=$(abspath $(BIN)) sh pipelines/demo.sh $(DEMO_ARGS)
endif # DEPS_DONE

install: all
	@[ "$(CUDA)" != emu ] || { echo "install: a CUDA=emu build is for tests only" >&2; exit 1; }
	install -d $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(PREFIX)/share/man/man1 $(DESTDIR)$(PREFIX)/share/man/man5
	install -m 755 $(TOOLS) $(DESTDIR)$(PREFIX)/bin
	$(if $(MAN1),install -m 644 $(MAN1) $(DESTDIR)$(PREFIX)/share/man/man1)
	$(if $(MAN5),install -m 644 $(MAN5) $(DESTDIR)$(PREFIX)/share/man/man5)
	$(if $(CUDA_PLUGIN),install -d $(DESTDIR)$(PREFIX)/lib/cdmoe && install -m 755 $(CUDA_PLUGIN) $(DESTDIR)$(PREFIX)/lib/cdmoe)

clean:
	rm -rf build build-san build-emu build-fuzz bin

.SECONDARY:
-include $(shell find $(BUILD) -name '*.d' 2>/dev/null)
