// cuda_bf16.h - CUDA emulator shim (tests/cudaemu): see emu.cpp.
#ifndef CUDAEMU_CUDA_BF16_H
#define CUDAEMU_CUDA_BF16_H
#include "cudaemu.h"
#endif
