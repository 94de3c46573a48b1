/* device.h - which compute devices this build and machine offer. */
#ifndef MOE_DEVICE_H
#define MOE_DEVICE_H

#include <stddef.h>

/* 1 when the library was built with the CUDA backend. */
int moe_device_cuda_built(void);
/* Number of usable CUDA devices (0 when none or not built); on failure the
 * reason goes to msg (e.g. "no CUDA-capable device is detected"). */
int moe_device_cuda_count(char *msg, size_t msglen);

#endif
