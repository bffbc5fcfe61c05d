/* sm_hash.h - the counter-based hash behind every dropout mask: the keep decision of an
 * element is a pure function of (seed, stream, element index), so threads need no shared
 * generator, chunked and whole passes agree, and backward recomputes a mask instead of storing
 * it. Shared by sm_model.c (activation dropout) and sm_attention.c (attention dropout). */
#ifndef SM_HASH_H
#define SM_HASH_H

#include <stdint.h>

/* The splitmix64 finaliser: a bijection of 64-bit words that mixes every input bit. */
static inline uint64_t sm_mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* A dropout mask: element e is kept when the top 32 bits of its hash reach `threshold`
 * (so p = threshold / 2^32), and a kept value is multiplied by `scale` = 1 / (1 - p). */
typedef struct {
    uint64_t key;
    uint32_t threshold;
    float scale;
} sm_drop_mask;

static inline sm_drop_mask sm_drop_mask_make(float p, uint64_t seed, uint64_t stream) {
    sm_drop_mask m;
    m.key = sm_mix64(seed ^ sm_mix64(stream + 0x632BE59BD9B4E019ull));
    double t = (double)p * 4294967296.0;
    m.threshold = t >= 4294967295.0 ? 0xFFFFFFFFu : (uint32_t)t;
    m.scale = p < 1.0f ? 1.0f / (1.0f - p) : 0.0f;
    return m;
}

/* The factor of element e: 0 (dropped) or scale (kept). */
static inline float sm_drop_factor(const sm_drop_mask *m, uint64_t e) {
    uint32_t h = (uint32_t)(sm_mix64(m->key + e * 0x9E3779B97F4A7C15ull) >> 32);
    return h < m->threshold ? 0.0f : m->scale;
}

#endif /* SM_HASH_H */
