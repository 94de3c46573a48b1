// cuda_runtime.h - CUDA emulator shim (tests/cudaemu): see emu.cpp.
// Only the emulated build puts this directory on the include path.
#ifndef CUDAEMU_CUDA_RUNTIME_H
#define CUDAEMU_CUDA_RUNTIME_H
#include "cudaemu.h"
#endif
