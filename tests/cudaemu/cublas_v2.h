// cublas_v2.h - CUDA emulator shim (tests/cudaemu): see emu.cpp.
#ifndef CUDAEMU_CUBLAS_V2_H
#define CUDAEMU_CUBLAS_V2_H
#include "cudaemu.h"
#endif
