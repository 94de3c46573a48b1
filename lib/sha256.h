/* sha256.h - SHA-256 (FIPS 180-4), for fingerprints. */
#ifndef MOE_SHA256_H
#define MOE_SHA256_H

#include <stddef.h>
#include <stdint.h>

typedef struct {
    uint32_t h[8];
    uint64_t len;        /* bytes hashed so far */
    unsigned char buf[64];
    size_t nbuf;
} moe_sha256;

void moe_sha256_init(moe_sha256 *s);
void moe_sha256_update(moe_sha256 *s, const void *data, size_t n);
void moe_sha256_final(moe_sha256 *s, unsigned char out[32]);
/* Final digest as 64 lowercase hex chars + NUL. */
void moe_sha256_hex(moe_sha256 *s, char out[65]);

#endif
