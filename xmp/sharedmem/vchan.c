/* libxenvchan's notify bytes (xmp.libs.vchan): each side sets the bits it
 * wants to be told about in its own byte and clears the peer's as it tells
 * it, both with full barriers (io.c's __sync_or_and_fetch /
 * __sync_fetch_and_and), so a request set just before a re-check of the
 * ring is never missed by a writer that clears it.  Kept apart from fast.c. */

uint8_t xmp_vchan_fetch_or8(uint8_t *p, uint8_t bits)
{
    return __atomic_fetch_or(p, bits, __ATOMIC_SEQ_CST);
}

uint8_t xmp_vchan_fetch_and8(uint8_t *p, uint8_t bits)
{
    return __atomic_fetch_and(p, bits, __ATOMIC_SEQ_CST);
}

uint8_t xmp_vchan_load8(const uint8_t *p)
{
    return __atomic_load_n(p, __ATOMIC_ACQUIRE);
}

void xmp_vchan_store8(uint8_t *p, uint8_t v)
{
    __atomic_store_n(p, v, __ATOMIC_SEQ_CST);
}
