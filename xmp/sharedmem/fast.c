/*
 * xmp's fast path: everything that touches memory shared with another
 * process concurrently.  Python cannot fence and cannot load a 32-bit word
 * atomically from a buffer, so every shared index, flag and bitmap is read
 * and written here, with GCC's __atomic builtins as the barriers that
 * xen/include/public/io/ring.h spells xen_wmb()/xen_mb().
 *
 * cffi releases the GIL around each call, so nothing here touches Python.
 * Layouts (all little-endian, x86-64 ABI) follow Xen's public headers:
 *   io/ring.h           sring header + slots
 *   io/console.h        xencons_interface
 *   io/xs_wire.h        xenstore_domain_interface
 *   grant_table.h       grant_entry_v1
 *   xen.h               shared_info / vcpu_info (2-level event channels)
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <semaphore.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define LOAD_ACQ(p) __atomic_load_n((p), __ATOMIC_ACQUIRE)
#define LOAD_RLX(p) __atomic_load_n((p), __ATOMIC_RELAXED)
#define STORE_REL(p, v) __atomic_store_n((p), (v), __ATOMIC_RELEASE)
#define STORE_RLX(p, v) __atomic_store_n((p), (v), __ATOMIC_RELAXED)
#define MB() __atomic_thread_fence(__ATOMIC_SEQ_CST)

static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static inline int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

uint32_t xmp_load32(const uint32_t *p) { return LOAD_ACQ(p); }
void xmp_store32(uint32_t *p, uint32_t v) { STORE_REL(p, v); }
void xmp_mb(void) { MB(); }

/* ------------------------------------------------------------------ */
/* io/ring.h                                                           */
/* ------------------------------------------------------------------ */

/* Offsets of the four shared indices in the 64-byte sring header. */
#define SR_REQ_PROD 0
#define SR_REQ_EVENT 1
#define SR_RSP_PROD 2
#define SR_RSP_EVENT 3

typedef struct {
    uint8_t *sring;      /* shared header, slots follow at +64 */
    uint32_t nr_ents;    /* power of two */
    uint32_t slot_size;
    uint32_t prod_pvt;   /* front: req_prod_pvt   back: rsp_prod_pvt */
    uint32_t cons;       /* front: rsp_cons       back: req_cons */
    int back;            /* 0 = front ring, 1 = back ring */
} xmp_ring_t;

static inline uint32_t *sr_idx(const xmp_ring_t *r, int which)
{
    return (uint32_t *)r->sring + which;
}
/* The backend is the frontend with input and output swapped. */
static inline uint32_t *out_prod(const xmp_ring_t *r) { return sr_idx(r, r->back ? SR_RSP_PROD : SR_REQ_PROD); }
static inline uint32_t *out_event(const xmp_ring_t *r) { return sr_idx(r, r->back ? SR_RSP_EVENT : SR_REQ_EVENT); }
static inline uint32_t *in_prod(const xmp_ring_t *r) { return sr_idx(r, r->back ? SR_REQ_PROD : SR_RSP_PROD); }
static inline uint32_t *in_event(const xmp_ring_t *r) { return sr_idx(r, r->back ? SR_REQ_EVENT : SR_RSP_EVENT); }
static inline uint8_t *slot(const xmp_ring_t *r, uint32_t idx)
{
    return r->sring + 64 + (size_t)(idx & (r->nr_ents - 1)) * r->slot_size;
}

/* SHARED_RING_INIT: only the frontend initialises the header. */
void xmp_ring_init_shared(uint8_t *sring)
{
    uint32_t *h = (uint32_t *)sring;
    memset(sring + 16, 0, 48);
    STORE_RLX(&h[SR_REQ_PROD], 0);
    STORE_RLX(&h[SR_RSP_PROD], 0);
    STORE_RLX(&h[SR_REQ_EVENT], 1);
    STORE_RLX(&h[SR_RSP_EVENT], 1);
    MB();
}

/* Slots the caller may still fill before pushing.
 * front: RING_FREE_REQUESTS; back: requests consumed but not answered. */
uint32_t xmp_ring_free(const xmp_ring_t *r)
{
    if (r->back)
        return r->cons - r->prod_pvt;
    return r->nr_ents - (r->prod_pvt - r->cons);
}

/* Messages waiting to be consumed, or -1 if the peer's producer index
 * claims more than a ring's worth (RING_{REQUEST,RESPONSE}_PROD_OVERFLOW):
 * a hostile or broken peer, never a reason to loop or read out of bounds. */
int64_t xmp_ring_unconsumed(const xmp_ring_t *r)
{
    uint32_t prod = LOAD_ACQ(in_prod(r));
    if (r->back) {
        if (prod - r->prod_pvt > r->nr_ents)
            return -1;
        uint32_t reqs = prod - r->cons;
        uint32_t rsps = r->nr_ents - (r->cons - r->prod_pvt);
        return reqs < rsps ? reqs : rsps;
    }
    if (prod - r->cons > r->nr_ents)
        return -1;
    return prod - r->cons;
}

/* Copy up to n messages of msg_size bytes (contiguous in src) into free
 * slots; returns how many were placed.  Nothing is visible to the peer
 * until xmp_ring_push. */
uint32_t xmp_ring_put(xmp_ring_t *r, const uint8_t *src, uint32_t n, uint32_t msg_size)
{
    uint32_t room = xmp_ring_free(r);
    if (n > room)
        n = room;
    if (msg_size > r->slot_size)
        return 0;
    for (uint32_t i = 0; i < n; i++)
        memcpy(slot(r, r->prod_pvt + i), src + (size_t)i * msg_size, msg_size);
    r->prod_pvt += n;
    return n;
}

/* RING_PUSH_{REQUESTS,RESPONSES}_AND_CHECK_NOTIFY: publish, then notify iff
 * the peer's event index lies in (old, new]. */
int xmp_ring_push(xmp_ring_t *r)
{
    uint32_t *prod = out_prod(r);
    uint32_t old = LOAD_RLX(prod);
    uint32_t new = r->prod_pvt;
    STORE_REL(prod, new);       /* xen_wmb(): slots before index */
    MB();                       /* xen_mb(): index before reading event */
    uint32_t ev = LOAD_RLX(out_event(r));
    return (uint32_t)(new - ev) < (uint32_t)(new - old);
}

/* Copy up to max waiting messages out of the shared slots into private
 * memory (each slot is read exactly once) and consume them.
 * Returns the count, or -1 on a producer-index overflow. */
int64_t xmp_ring_get(xmp_ring_t *r, uint8_t *dst, uint32_t max, uint32_t msg_size)
{
    int64_t avail = xmp_ring_unconsumed(r);   /* acquire: slots after index */
    if (avail < 0)
        return -1;
    if (msg_size > r->slot_size)
        return -1;
    uint32_t n = (uint32_t)avail < max ? (uint32_t)avail : max;
    for (uint32_t i = 0; i < n; i++)
        memcpy(dst + (size_t)i * msg_size, slot(r, r->cons + i), msg_size);
    /* Our reads of the slots must complete before the peer may reuse them:
     * the release is carried by the next push of our own index (front) or
     * by the consumer index being private (back).  A full fence here keeps
     * the front's reuse of response slots ordered too. */
    __atomic_thread_fence(__ATOMIC_RELEASE);
    r->cons += n;
    return n;
}

/* RING_FINAL_CHECK_FOR_{REQUESTS,RESPONSES}: if nothing is waiting, ask to
 * be notified at the next message, fence, and look again -- a message
 * published between the two looks is then either seen here or notified.
 * Returns the waiting count (0 = safe to sleep) or -1 on overflow. */
int64_t xmp_ring_final_check(xmp_ring_t *r)
{
    int64_t work = xmp_ring_unconsumed(r);
    if (work != 0)
        return work;
    STORE_RLX(in_event(r), r->cons + 1);
    MB();
    return xmp_ring_unconsumed(r);
}

/* Set the event index by hand (batching: "wake me after k more"). */
void xmp_ring_set_event(xmp_ring_t *r, uint32_t value)
{
    STORE_RLX(in_event(r), value);
    MB();
}

/* ------------------------------------------------------------------ */
/* Byte rings: io/console.h and io/xs_wire.h                           */
/* ------------------------------------------------------------------ */

/* A byte ring is `data[size]` with free-running u32 cons/prod indices
 * elsewhere in the same page; size is a power of two.  Each side owns one
 * index.  Returns bytes moved, or -1 when the indices claim more than
 * `size` bytes in flight (a hostile peer). */
int64_t xmp_bytering_write(uint8_t *data, uint32_t size, uint32_t *cons_p,
                           uint32_t *prod_p, const uint8_t *src, uint32_t len)
{
    uint32_t cons = LOAD_ACQ(cons_p);   /* the reader is done with those bytes */
    uint32_t prod = LOAD_RLX(prod_p);
    if (prod - cons > size)
        return -1;
    uint32_t room = size - (prod - cons);
    uint32_t n = len < room ? len : room;
    for (uint32_t done = 0; done < n;) {
        uint32_t off = (prod + done) & (size - 1);
        uint32_t chunk = size - off;
        if (chunk > n - done)
            chunk = n - done;
        memcpy(data + off, src + done, chunk);
        done += chunk;
    }
    STORE_REL(prod_p, prod + n);
    return n;
}

int64_t xmp_bytering_read(uint8_t *data, uint32_t size, uint32_t *cons_p,
                          uint32_t *prod_p, uint8_t *dst, uint32_t len)
{
    uint32_t prod = LOAD_ACQ(prod_p);
    uint32_t cons = LOAD_RLX(cons_p);
    if (prod - cons > size)
        return -1;
    uint32_t avail = prod - cons;
    uint32_t n = len < avail ? len : avail;
    for (uint32_t done = 0; done < n;) {
        uint32_t off = (cons + done) & (size - 1);
        uint32_t chunk = size - off;
        if (chunk > n - done)
            chunk = n - done;
        memcpy(dst + done, data + off, chunk);
        done += chunk;
    }
    STORE_REL(cons_p, cons + n);
    return n;
}

/* ------------------------------------------------------------------ */
/* Grant table v1 (grant_table.h)                                      */
/* ------------------------------------------------------------------ */

#define GTF_type_mask 3u
#define GTF_permit_access 1u
#define GTF_readonly (1u << 2)
#define GTF_reading (1u << 3)
#define GTF_writing (1u << 4)

#define GNTST_okay 0
#define GNTST_general_error (-1)
#define GNTST_bad_gntref (-3)
#define GNTST_permission_denied (-8)
#define GNTST_bad_page (-9)
#define GNTST_bad_copy_arg (-10)
#define GNTST_eagain (-12)

typedef struct {
    uint16_t flags;
    uint16_t domid;
    uint32_t frame;
} xmp_grant_entry_t;

/* Xen's private "active entry": how many live mappings pin a grant.  It
 * lives only in the supervisor; the shared GTF_reading/GTF_writing bits
 * are its public shadow. */
typedef struct {
    uint32_t readers;
    uint32_t writers;
} xmp_active_t;

typedef struct xmp_active_table {
    pthread_mutex_t lock;
    uint32_t nr;
    xmp_active_t ent[];
} xmp_active_table_t;

xmp_active_table_t *xmp_active_new(uint32_t nr)
{
    xmp_active_table_t *t = calloc(1, sizeof(*t) + (size_t)nr * sizeof(xmp_active_t));
    if (!t)
        return NULL;
    pthread_mutex_init(&t->lock, NULL);
    t->nr = nr;
    return t;
}

void xmp_active_free(xmp_active_table_t *t)
{
    if (t) {
        pthread_mutex_destroy(&t->lock);
        free(t);
    }
}

uint32_t xmp_active_pins(xmp_active_table_t *t, uint32_t ref, int writers)
{
    if (ref >= t->nr)
        return 0;
    return writers ? t->ent[ref].writers : t->ent[ref].readers;
}

/* The granting side: domid and frame first, barrier, then flags. */
void xmp_gnttab_grant(xmp_grant_entry_t *tab, uint32_t ref, uint16_t domid,
                      uint32_t frame, int readonly)
{
    xmp_grant_entry_t *e = &tab[ref];
    STORE_RLX(&e->domid, domid);
    STORE_RLX(&e->frame, frame);
    STORE_REL(&e->flags, (uint16_t)(GTF_permit_access | (readonly ? GTF_readonly : 0)));
}

/* gnttab_end_foreign_access_ref: clear the entry only if nobody has it
 * mapped (cmpxchg flags -> 0).  Returns 0, or -EBUSY while in use. */
int xmp_gnttab_end_access(xmp_grant_entry_t *tab, uint32_t ref)
{
    uint16_t *fp = &tab[ref].flags;
    uint16_t flags = LOAD_ACQ(fp);
    do {
        if (flags & (GTF_reading | GTF_writing))
            return -EBUSY;
    } while (!__atomic_compare_exchange_n(fp, &flags, 0, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE));
    return 0;
}

/* Writable -> read-only, allowed only while nobody writes through it. */
int xmp_gnttab_make_readonly(xmp_grant_entry_t *tab, uint32_t ref)
{
    uint16_t *fp = &tab[ref].flags;
    uint16_t flags = LOAD_ACQ(fp);
    do {
        if (flags & GTF_writing)
            return -EBUSY;
    } while (!__atomic_compare_exchange_n(fp, &flags, (uint16_t)(flags | GTF_readonly), 0,
                                          __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE));
    return 0;
}

/* The check Xen makes when a grant is mapped or copied (_set_status_v1):
 * flags and domid are one 32-bit word, compared and updated with a single
 * cmpxchg so a granter rewriting the entry concurrently cannot slip a
 * different domid or a revocation past the check.  Caller holds act->lock. */
static void release(xmp_grant_entry_t *tab, xmp_active_table_t *act, uint32_t ref, int readonly);

static int acquire(xmp_grant_entry_t *tab, uint32_t nr, xmp_active_table_t *act,
                   uint32_t ref, uint16_t mapper, int readonly, uint64_t frame_limit,
                   uint32_t *frame)
{
    if (ref >= nr || ref >= act->nr)
        return GNTST_bad_gntref;
    uint32_t *word = (uint32_t *)&tab[ref];   /* flags | domid << 16 */
    uint32_t cur = LOAD_ACQ(word);
    for (int retries = 0;; retries++) {
        uint16_t flags = (uint16_t)cur;
        uint16_t domid = (uint16_t)(cur >> 16);
        if ((flags & GTF_type_mask) != GTF_permit_access || domid != mapper)
            return GNTST_permission_denied;
        if (!readonly && (flags & GTF_readonly))
            return GNTST_permission_denied;
        uint32_t want = cur | GTF_reading | (readonly ? 0 : GTF_writing);
        if (want == cur || __atomic_compare_exchange_n(word, &cur, want, 0, __ATOMIC_ACQ_REL,
                                                       __ATOMIC_ACQUIRE))
            break;
        if (retries > 64)   /* a granter flipping the entry forever */
            return GNTST_general_error;
    }
    *frame = LOAD_ACQ(&tab[ref].frame);
    act->ent[ref].readers++;
    if (!readonly)
        act->ent[ref].writers++;
    if (*frame >= frame_limit) {   /* a frame outside the granter's memory */
        release(tab, act, ref, readonly);
        return GNTST_bad_page;
    }
    return GNTST_okay;
}

static void release(xmp_grant_entry_t *tab, xmp_active_table_t *act, uint32_t ref, int readonly)
{
    xmp_active_t *a = &act->ent[ref];
    uint16_t clear = 0;
    if (a->readers && --a->readers == 0)
        clear |= GTF_reading;
    if (!readonly && a->writers && --a->writers == 0)
        clear |= GTF_writing;
    if (clear)
        __atomic_fetch_and(&tab[ref].flags, (uint16_t)~clear, __ATOMIC_ACQ_REL);
}

/* map_grant_ref on a batch of refs; stops at the first failure.  Returns
 * the number mapped; statuses[i] and frames[i] are filled per ref. */
uint32_t xmp_gnttab_map(xmp_grant_entry_t *tab, uint32_t nr, xmp_active_table_t *act,
                        const uint32_t *refs, uint32_t n, uint16_t mapper, int readonly,
                        uint64_t frame_limit, uint32_t *frames, int16_t *statuses)
{
    uint32_t done = 0;
    pthread_mutex_lock(&act->lock);
    for (; done < n; done++) {
        int st = acquire(tab, nr, act, refs[done], mapper, readonly, frame_limit, &frames[done]);
        statuses[done] = (int16_t)st;
        if (st != GNTST_okay)
            break;
    }
    pthread_mutex_unlock(&act->lock);
    return done;
}

/* unmap_grant_ref: drop one pin per ref, clearing the in-use bits when the
 * last mapping of that kind goes. */
void xmp_gnttab_unmap(xmp_grant_entry_t *tab, xmp_active_table_t *act,
                      const uint32_t *refs, uint32_t n, int readonly)
{
    pthread_mutex_lock(&act->lock);
    for (uint32_t i = 0; i < n; i++)
        if (refs[i] < act->nr)
            release(tab, act, refs[i], readonly);
    pthread_mutex_unlock(&act->lock);
}

/* One side of GNTTABOP_copy.  With `tab` set, `ref` is a grant reference
 * into that table (checked against `caller`); with `tab` NULL, `ref` is a
 * frame of the caller's own memory. */
typedef struct {
    uint8_t *mem;
    uint64_t mem_len;
    xmp_grant_entry_t *tab;
    uint32_t nr;
    xmp_active_table_t *act;
    uint32_t ref;
    uint32_t offset;
} xmp_copy_ptr_t;

static int copy_side(xmp_copy_ptr_t *p, uint16_t caller, int readonly, uint32_t len,
                     uint8_t **addr)
{
    uint32_t frame = p->ref;
    if (p->tab) {
        pthread_mutex_lock(&p->act->lock);
        int st = acquire(p->tab, p->nr, p->act, p->ref, caller, readonly, p->mem_len / 4096, &frame);
        pthread_mutex_unlock(&p->act->lock);
        if (st != GNTST_okay)
            return st;
    }
    if ((uint64_t)frame * 4096 + 4096 > p->mem_len) {
        if (p->tab) {
            pthread_mutex_lock(&p->act->lock);
            release(p->tab, p->act, p->ref, readonly);
            pthread_mutex_unlock(&p->act->lock);
        }
        return GNTST_bad_page;
    }
    *addr = p->mem + (uint64_t)frame * 4096 + p->offset;
    (void)len;
    return GNTST_okay;
}

static void copy_done(xmp_copy_ptr_t *p, int readonly)
{
    if (p->tab) {
        pthread_mutex_lock(&p->act->lock);
        release(p->tab, p->act, p->ref, readonly);
        pthread_mutex_unlock(&p->act->lock);
    }
}

/* GNTTABOP_copy of one segment: both ends pinned for the copy only; a
 * segment may not cross a page boundary on either side. */
int xmp_gnttab_copy(xmp_copy_ptr_t *src, xmp_copy_ptr_t *dst, uint32_t len, uint16_t caller)
{
    uint8_t *s, *d;
    if (src->offset + len > 4096 || dst->offset + len > 4096)
        return GNTST_bad_copy_arg;
    int st = copy_side(src, caller, 1, len, &s);
    if (st != GNTST_okay)
        return st;
    st = copy_side(dst, caller, 0, len, &d);
    if (st != GNTST_okay) {
        copy_done(src, 1);
        return st;
    }
    memmove(d, s, len);
    copy_done(dst, 0);
    copy_done(src, 1);
    return GNTST_okay;
}

/* A whole GNTTABOP_copy: segment i from src[i] to dst[i], each checked and
 * pinned on its own, in order; status[i] says how it went. */
void xmp_gnttab_copy_batch(xmp_copy_ptr_t *src, xmp_copy_ptr_t *dst, const uint32_t *len,
                           int16_t *status, uint32_t n, uint16_t caller)
{
    for (uint32_t i = 0; i < n; i++)
        status[i] = (int16_t)xmp_gnttab_copy(&src[i], &dst[i], len[i], caller);
}

/* GNTTABOP_copy as Xen takes it: an array of struct gnttab_copy in the
 * caller's memory (grant_table.h, x86_64 layout, 40 bytes each).  A side is
 * a grant (GNTCOPY_*_gref: `ref` in `domid`'s table) or a frame of the
 * caller's own memory (`gmfn`, domid DOMID_SELF). */
typedef struct {
    union { uint32_t ref; uint64_t gmfn; } u;
    uint16_t domid;
    uint16_t offset;
} xmp_gnttab_copy_ptr_t;

typedef struct {
    xmp_gnttab_copy_ptr_t source, dest;
    uint16_t len;
    uint16_t flags;
    int16_t status;
} xmp_gnttab_copy_t;

_Static_assert(sizeof(xmp_gnttab_copy_t) == 40, "struct gnttab_copy is 40 bytes on x86_64");

/* A domain a copy may reach; doms[0] is always the caller. */
typedef struct {
    uint16_t domid;
    uint8_t *mem;
    uint64_t mem_len;
    xmp_grant_entry_t *tab;
    uint32_t nr;
    xmp_active_table_t *act;
} xmp_copy_dom_t;

#define GNTCOPY_source_gref 1u
#define GNTCOPY_dest_gref 2u
#define GNTST_bad_domain (-2)
#define XMP_DOMID_SELF 0x7FF0u

/* The other domains whose grants the records name (at most `max`, each once):
 * the supervisor looks them up before xmp_gnttab_copy_ops runs. */
uint32_t xmp_gnttab_copy_domids(const xmp_gnttab_copy_t *ops, uint32_t n, uint16_t caller,
                                uint16_t *out, uint32_t max)
{
    uint32_t k = 0;
    for (uint32_t i = 0; i < n; i++) {
        for (int side = 0; side < 2; side++) {
            const xmp_gnttab_copy_ptr_t *p = side ? &ops[i].dest : &ops[i].source;
            if (!(ops[i].flags & (side ? GNTCOPY_dest_gref : GNTCOPY_source_gref))
                || p->domid == XMP_DOMID_SELF || p->domid == caller)
                continue;
            uint32_t j = 0;
            while (j < k && out[j] != p->domid)
                j++;
            if (j == k && k < max)
                out[k++] = p->domid;
        }
    }
    return k;
}

static int copy_ptr_of(const xmp_gnttab_copy_ptr_t *p, int gref, uint16_t caller,
                       const xmp_copy_dom_t *doms, uint32_t ndoms, xmp_copy_ptr_t *out)
{
    if (p->offset >= 4096)
        return GNTST_bad_copy_arg;
    out->offset = p->offset;
    if (!gref) {   /* only one's own memory is named by frame */
        if (p->domid != XMP_DOMID_SELF && p->domid != caller)
            return GNTST_permission_denied;
        if (p->u.gmfn >= doms[0].mem_len / 4096)
            return GNTST_bad_copy_arg;
        out->mem = doms[0].mem;
        out->mem_len = doms[0].mem_len;
        out->tab = NULL;
        out->ref = (uint32_t)p->u.gmfn;
        return GNTST_okay;
    }
    uint16_t domid = p->domid == XMP_DOMID_SELF ? caller : p->domid;
    for (uint32_t i = 0; i < ndoms; i++) {
        if (doms[i].domid == domid) {
            out->mem = doms[i].mem;
            out->mem_len = doms[i].mem_len;
            out->tab = doms[i].tab;
            out->nr = doms[i].nr;
            out->act = doms[i].act;
            out->ref = p->u.ref;
            return GNTST_okay;
        }
    }
    return GNTST_bad_domain;
}

/* Run every record in order, each checked and pinned on its own; its status
 * is written into the record.  `ops` is the supervisor's private copy. */
void xmp_gnttab_copy_ops(xmp_gnttab_copy_t *ops, uint32_t n, uint16_t caller,
                         const xmp_copy_dom_t *doms, uint32_t ndoms)
{
    for (uint32_t i = 0; i < n; i++) {
        xmp_gnttab_copy_t *op = &ops[i];
        xmp_copy_ptr_t src, dst;
        int st;
        if ((op->flags & ~(GNTCOPY_source_gref | GNTCOPY_dest_gref)) || op->len > 4096)
            st = GNTST_bad_copy_arg;
        else if ((st = copy_ptr_of(&op->source, op->flags & GNTCOPY_source_gref, caller, doms, ndoms,
                                   &src)) == GNTST_okay
                 && (st = copy_ptr_of(&op->dest, op->flags & GNTCOPY_dest_gref, caller, doms, ndoms,
                                      &dst)) == GNTST_okay)
            st = xmp_gnttab_copy(&src, &dst, op->len, caller);
        op->status = (int16_t)st;
    }
}

/* The statuses back into the caller's records (Xen writes op->status only). */
void xmp_gnttab_copy_status_out(uint8_t *dst, const xmp_gnttab_copy_t *ops, uint32_t n)
{
    for (uint32_t i = 0; i < n; i++)
        memcpy(dst + (size_t)i * sizeof(xmp_gnttab_copy_t) + offsetof(xmp_gnttab_copy_t, status),
               &ops[i].status, sizeof(int16_t));
}

/* ------------------------------------------------------------------ */
/* Event channels, 2-level ABI (xen.h shared_info / vcpu_info)         */
/* ------------------------------------------------------------------ */

/* A domain's event state is split by who may write it (see evtchn.py):
 *
 *  - the private event object, held only by the domain and the supervisor:
 *    page 0 is Xen's shared_info (vcpu_info[32] at 0, evtchn_pending at
 *    2048, evtchn_mask at 2560); page 1 xmp's per-vCPU upcall records and
 *    the doorbell generation; pages 2-3 the owner table, owner[port] =
 *    1 + the domid a port is bound to (written by the supervisor), so that
 *    a doorbell's bits count only for ports bound to its sender; page 4
 *    notify_vcpu[port] u8, the vCPU a port is delivered to (Xen's
 *    notify_vcpu_id, set by bind_virq / bind_ipi / bind_vcpu);
 *  - the wake page, one word per vCPU ("I am about to sleep"): the domain
 *    writes it, everyone else holds it sealed read-only;
 *  - one doorbell per (receiver, sender): summary[32] u64 (per-vCPU
 *    selector) at 0, kick[32] u32 at 256, pending[64] u64 at 512: the only
 *    thing a sender writes.
 *
 * The kick: a sender bumps *its own* doorbell's kick word and, if the
 * receiver said it sleeps, FUTEX_WAKEs it; the supervisor (and the domain
 * itself) bump the private object's kick word.  The receiver sleeps in
 * futex_waitv on all of them at once, each with the value it read before
 * its last look, so a kick landing between that look and the sleep makes
 * the wait return at once (a futex whose word nobody changes would lose
 * it).  A sender can only change, or park a thread on, its own word: it
 * disturbs only its own wake-ups (and wakes are FUTEX_WAKE of all waiters,
 * so a parked thread steals nothing).  futex_waitv takes 128 words: past
 * 127 doorbells the rest are polled every XMP_OVERFLOW_POLL_NS while
 * asleep. */
#include <limits.h>
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>

#ifndef __NR_futex_waitv
#define __NR_futex_waitv 449
#endif
#define XMP_FUTEX2_SIZE_U32 0x02
#define XMP_WAITV_MAX 128
#define XMP_OVERFLOW_POLL_NS 1000000LL
/* A doorbell whose news keeps holding nothing deliverable (a sender
 * scribbling its summary word) is muted: not looked at, not waited on --
 * its sender can then neither wake nor busy the receiver -- for
 * XMP_MUTE_NS, doubling up to 2^7 times while it goes on.  Its bits wait
 * (what it really sent is delivered after the mute, late, not lost). */
#define XMP_EMPTY_LIMIT 64
#define XMP_MUTE_NS 2000000LL

#define XMP_MAX_VCPUS 32
#define NR_PORTS 4096
#define SHINFO_PENDING 2048
#define SHINFO_MASK 2560
#define UPCALL_PAGE 4096
#define OWNER_PAGE 8192
#define NOTIFY_PAGE 16384
#define DB_KICK 256
#define DB_PENDING 512

typedef struct {
    uint8_t evtchn_upcall_pending;
    uint8_t evtchn_upcall_mask;
    uint8_t pad[6];
    uint64_t evtchn_pending_sel;
    uint8_t arch[16];
    uint8_t time[32];
} xmp_vcpu_info_t;

typedef struct {
    uint32_t shutdown;      /* set by whoever wants the waiter to return */
    uint32_t db_gen;        /* record 0 only: bumped when a doorbell is added or gone */
    uint32_t kick;          /* the private futex word: bumped by every private kick */
    uint8_t pad[52];
} xmp_upcall_t;

typedef struct {
    uint8_t *db;
    uint32_t owner;         /* 1 + the sender's domid */
    uint32_t empty;         /* scans in a row that found news but nothing to deliver */
    int64_t muted_until;    /* CLOCK_MONOTONIC ns; 0: not muted */
    uint32_t strikes;       /* mutes in a row: the next one lasts longer */
    uint32_t pad;
} xmp_doorbell_ref_t;

typedef struct {
    uint8_t *ev;
    uint32_t *wake;
    xmp_doorbell_ref_t *dbs;
    uint32_t nr_dbs;
    uint32_t seen_gen;      /* the doorbell generation dbs[] was built for */
} xmp_evtchn_t;

static inline xmp_vcpu_info_t *vcpu_info(uint8_t *ev, uint32_t vcpu)
{
    return (xmp_vcpu_info_t *)(ev + vcpu * 64);
}
static inline uint64_t *pending_words(uint8_t *ev) { return (uint64_t *)(ev + SHINFO_PENDING); }
static inline uint64_t *mask_words(uint8_t *ev) { return (uint64_t *)(ev + SHINFO_MASK); }
static inline uint16_t *owners(uint8_t *ev) { return (uint16_t *)(ev + OWNER_PAGE); }
static inline uint32_t notify_vcpu(uint8_t *ev, uint32_t port)
{
    uint32_t v = __atomic_load_n(ev + NOTIFY_PAGE + port, __ATOMIC_ACQUIRE);
    return v < XMP_MAX_VCPUS ? v : 0;
}
static inline xmp_upcall_t *upcall(uint8_t *ev, uint32_t vcpu)
{
    return (xmp_upcall_t *)(ev + UPCALL_PAGE) + vcpu;
}
static inline uint32_t *wake_word(const uint32_t *wake, uint32_t vcpu)
{
    return (uint32_t *)wake + vcpu * 16;   /* one cache line each */
}
static inline uint64_t *db_summary(uint8_t *db, uint32_t vcpu) { return (uint64_t *)db + vcpu; }
static inline uint64_t *db_pending(uint8_t *db) { return (uint64_t *)(db + DB_PENDING); }
static inline uint32_t *db_kick(uint8_t *db, uint32_t vcpu) { return (uint32_t *)(db + DB_KICK) + vcpu; }

uint32_t xmp_evtchn_sizeof_upcall(void) { return sizeof(xmp_upcall_t); }

/* Reset the upcall records of a fresh event object (creator only). */
int xmp_evtchn_init(uint8_t *ev, uint32_t nr_vcpus)
{
    if (nr_vcpus > XMP_MAX_VCPUS)
        return -EINVAL;
    for (uint32_t v = 0; v < nr_vcpus; v++)
        STORE_RLX(&upcall(ev, v)->shutdown, 0);
    MB();
    return 0;
}

void xmp_evtchn_destroy(uint8_t *ev, uint32_t nr_vcpus)
{
    (void)ev;
    (void)nr_vcpus;   /* nothing left to destroy: no semaphores any more */
}

/* Bump the futex word `word`, then wake the vCPU if it said it sleeps.
 * The seq_cst RMWs and this seq_cst load pair with the waiter's store of
 * the flag and its re-check: one of the two sees the other; and a bump
 * after the waiter read the word makes its futex_waitv return at once. */
static void kick_word(uint32_t *word, const uint32_t *wake, uint32_t vcpu)
{
    __atomic_fetch_add(word, 1, __ATOMIC_SEQ_CST);
    if (__atomic_load_n(wake_word(wake, vcpu), __ATOMIC_SEQ_CST))
        syscall(SYS_futex, word, FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
}

static inline void wake_if_sleeping(uint8_t *ev, const uint32_t *wake, uint32_t vcpu)
{
    kick_word(&upcall(ev, vcpu)->kick, wake, vcpu);
}

static void kick(uint8_t *ev, const uint32_t *wake, uint32_t vcpu, uint32_t port)
{
    xmp_vcpu_info_t *vi = vcpu_info(ev, vcpu);
    uint64_t selbit = 1ULL << (port / 64);
    uint64_t old_sel = __atomic_fetch_or(&vi->evtchn_pending_sel, selbit, __ATOMIC_SEQ_CST);
    if (old_sel & selbit)
        return;
    if (__atomic_exchange_n(&vi->evtchn_upcall_pending, 1, __ATOMIC_SEQ_CST) == 0)
        wake_if_sleeping(ev, wake, vcpu);
}

/* evtchn_2l_set_pending on the private object (the supervisor, or the
 * domain raising its own port): test-and-set the pending bit; only a 0->1
 * transition on an unmasked port goes on to the selector, upcall flag and
 * wake.  Returns 1 if the receiver was kicked. */
int xmp_evtchn_send(xmp_evtchn_t *e, uint32_t port, uint32_t vcpu)
{
    if (port >= NR_PORTS || vcpu >= XMP_MAX_VCPUS)
        return -EINVAL;
    vcpu = notify_vcpu(e->ev, port);   /* as Xen: the port's notify vCPU decides */
    uint64_t bit = 1ULL << (port % 64);
    uint64_t old = __atomic_fetch_or(&pending_words(e->ev)[port / 64], bit, __ATOMIC_SEQ_CST);
    if (old & bit)
        return 0;
    if (LOAD_ACQ(&mask_words(e->ev)[port / 64]) & bit)
        return 0;
    kick(e->ev, e->wake, vcpu, port);
    return 1;
}

/* A sender's notify through its doorbell: set the bit; on its 0->1
 * transition set the vCPU's summary bit; on *that* 0->1 transition wake the
 * receiver if it sleeps (a set summary bit is one the receiver has not
 * taken yet, so it will look).  The sender cannot see the receiver's mask:
 * a masked port costs at most one spurious wake, after which its bit stays
 * set and further sends stop here.  Returns 1 if the receiver was told.
 * Doorbells are vCPU 0's alone (the sender cannot see which vCPU a port is
 * bound to): vCPU 0's scan forwards a port bound elsewhere to its vCPU. */
int xmp_doorbell_send(uint8_t *db, const uint32_t *wake, uint32_t port, uint32_t vcpu)
{
    if (port >= NR_PORTS || vcpu >= XMP_MAX_VCPUS)
        return -EINVAL;
    vcpu = 0;
    uint64_t bit = 1ULL << (port % 64);
    if (__atomic_fetch_or(&db_pending(db)[port / 64], bit, __ATOMIC_SEQ_CST) & bit)
        return 0;
    uint64_t selbit = 1ULL << (port / 64);
    if (__atomic_fetch_or(db_summary(db, vcpu), selbit, __ATOMIC_SEQ_CST) & selbit)
        return 0;
    kick_word(db_kick(db, vcpu), wake, vcpu);
    return 1;
}

void xmp_evtchn_set_owner(uint8_t *ev, uint32_t port, uint32_t owner)
{
    if (port < NR_PORTS)
        __atomic_store_n(&owners(ev)[port], (uint16_t)owner, __ATOMIC_SEQ_CST);
}

void xmp_evtchn_kick(xmp_evtchn_t *e, uint32_t vcpu);

/* EVTCHNOP_bind_vcpu (and the binds that name a vCPU): deliver `port` to
 * `vcpu` from now on.  What is pending is told to the new vCPU (and to
 * vCPU 0, which forwards what waits in a doorbell): at worst spurious. */
int xmp_evtchn_set_vcpu(xmp_evtchn_t *e, uint32_t port, uint32_t vcpu)
{
    if (port >= NR_PORTS || vcpu >= XMP_MAX_VCPUS)
        return -EINVAL;
    __atomic_store_n(e->ev + NOTIFY_PAGE + port, (uint8_t)vcpu, __ATOMIC_SEQ_CST);
    uint64_t bit = 1ULL << (port % 64);
    if ((LOAD_ACQ(&pending_words(e->ev)[port / 64]) & bit) && !(LOAD_ACQ(&mask_words(e->ev)[port / 64]) & bit))
        kick(e->ev, e->wake, vcpu, port);
    if (LOAD_ACQ(&owners(e->ev)[port]))
        xmp_evtchn_kick(e, 0);
    return 0;
}

/* A doorbell was added or has gone: make every vCPU look (evtchn.py then
 * asks the supervisor for the new set before it scans). */
void xmp_evtchn_bump_gen(xmp_evtchn_t *e, uint32_t nr_vcpus)
{
    __atomic_fetch_add(&upcall(e->ev, 0)->db_gen, 1, __ATOMIC_SEQ_CST);
    for (uint32_t v = 0; v < nr_vcpus && v < XMP_MAX_VCPUS; v++) {
        __atomic_store_n(&vcpu_info(e->ev, v)->evtchn_upcall_pending, 1, __ATOMIC_SEQ_CST);
        wake_if_sleeping(e->ev, e->wake, v);
    }
}

/* Make the vCPU look again (no port raised): spurious, which is allowed. */
void xmp_evtchn_kick(xmp_evtchn_t *e, uint32_t vcpu)
{
    if (vcpu >= XMP_MAX_VCPUS)
        return;
    if (__atomic_exchange_n(&vcpu_info(e->ev, vcpu)->evtchn_upcall_pending, 1, __ATOMIC_SEQ_CST) == 0)
        wake_if_sleeping(e->ev, e->wake, vcpu);
}

uint32_t xmp_evtchn_db_gen(const xmp_evtchn_t *e)
{
    return LOAD_ACQ(&upcall(e->ev, 0)->db_gen);
}

void xmp_evtchn_mask(xmp_evtchn_t *e, uint32_t port)
{
    __atomic_fetch_or(&mask_words(e->ev)[port / 64], 1ULL << (port % 64), __ATOMIC_SEQ_CST);
}

/* Is `port` pending in the doorbell of the sender it is bound to? */
static xmp_doorbell_ref_t *db_holding(xmp_evtchn_t *e, uint32_t port)
{
    uint32_t owner = LOAD_ACQ(&owners(e->ev)[port]);
    if (!owner)
        return NULL;
    for (uint32_t i = 0; i < e->nr_dbs; i++)
        if (e->dbs[i].owner == owner)
            return (LOAD_ACQ(&db_pending(e->dbs[i].db)[port / 64]) >> (port % 64)) & 1 ? &e->dbs[i] : NULL;
    return NULL;
}

/* EVTCHNOP_unmask: clear the mask and re-deliver an event that arrived
 * while masked, in the private bitmap or in its sender's doorbell (which
 * the next scan takes: its summary bit is set again here). */
int xmp_evtchn_unmask(xmp_evtchn_t *e, uint32_t port, uint32_t vcpu)
{
    if (port >= NR_PORTS || vcpu >= XMP_MAX_VCPUS)
        return -EINVAL;
    uint64_t bit = 1ULL << (port % 64);
    __atomic_fetch_and(&mask_words(e->ev)[port / 64], ~bit, __ATOMIC_SEQ_CST);
    if (LOAD_ACQ(&pending_words(e->ev)[port / 64]) & bit) {
        kick(e->ev, e->wake, notify_vcpu(e->ev, port), port);
        return 1;
    }
    xmp_doorbell_ref_t *d = db_holding(e, port);
    if (d != NULL) {   /* doorbells are vCPU 0's: it forwards */
        __atomic_fetch_or(db_summary(d->db, 0), 1ULL << (port / 64), __ATOMIC_SEQ_CST);
        xmp_vcpu_info_t *vi = vcpu_info(e->ev, 0);
        if (__atomic_exchange_n(&vi->evtchn_upcall_pending, 1, __ATOMIC_SEQ_CST) == 0)
            wake_if_sleeping(e->ev, e->wake, 0);
        return 1;
    }
    return 0;
}

void xmp_evtchn_clear(xmp_evtchn_t *e, uint32_t port)
{
    uint64_t bit = 1ULL << (port % 64);
    __atomic_fetch_and(&pending_words(e->ev)[port / 64], ~bit, __ATOMIC_SEQ_CST);
    xmp_doorbell_ref_t *d = db_holding(e, port);
    if (d != NULL)
        __atomic_fetch_and(&db_pending(d->db)[port / 64], ~bit, __ATOMIC_SEQ_CST);
}

int xmp_evtchn_is_pending(xmp_evtchn_t *e, uint32_t port)
{
    return ((LOAD_ACQ(&pending_words(e->ev)[port / 64]) >> (port % 64)) & 1) || db_holding(e, port) != NULL;
}

int xmp_evtchn_is_masked(xmp_evtchn_t *e, uint32_t port)
{
    return (LOAD_ACQ(&mask_words(e->ev)[port / 64]) >> (port % 64)) & 1;
}

/* Harvest one doorbell's news for `vcpu`: bits of ports bound to its
 * sender, unmasked, are taken; masked ones stay set (the sender then stops
 * telling); bits for ports not bound to this sender are a hostile or stale
 * sender's noise and are dropped.  Returns the new count, or max + 1 when
 * out of room (the rest stays for the next scan). */
static inline int muted(xmp_doorbell_ref_t *d)
{
    if (!d->muted_until)
        return 0;
    if (now_ns() < d->muted_until)
        return 1;
    d->muted_until = 0;
    return 0;
}

static uint32_t scan_doorbell(xmp_evtchn_t *e, xmp_doorbell_ref_t *d, uint32_t vcpu,
                              uint32_t *ports, uint32_t n, uint32_t max)
{
    uint64_t *sum = db_summary(d->db, vcpu);
    if (__atomic_load_n(sum, __ATOMIC_RELAXED) == 0 || muted(d))
        return n;   /* the common case with many peers: one plain load each */
    uint32_t before = n, n_fwd = 0;
    uint64_t sel = __atomic_exchange_n(sum, 0, __ATOMIC_SEQ_CST);
    uint64_t *pend = db_pending(d->db);
    uint16_t *own = owners(e->ev);
    while (sel) {
        uint32_t w = (uint32_t)__builtin_ctzll(sel);
        sel &= sel - 1;
        uint64_t live = LOAD_ACQ(&pend[w]) & ~LOAD_ACQ(&mask_words(e->ev)[w]);
        while (live) {
            uint32_t b = (uint32_t)__builtin_ctzll(live);
            live &= live - 1;
            uint64_t bit = 1ULL << b;
            if (n == max) {
                __atomic_fetch_or(sum, (1ULL << w) | sel, __ATOMIC_SEQ_CST);
                return max + 1;
            }
            uint32_t port = w * 64 + b;
            int taken = (__atomic_fetch_and(&pend[w], ~bit, __ATOMIC_SEQ_CST) & bit) != 0;
            if (!taken || LOAD_ACQ(&own[port]) != d->owner)
                continue;
            uint32_t to = notify_vcpu(e->ev, port);
            if (to == vcpu) {
                ports[n++] = port;
            } else if (!(__atomic_fetch_or(&pending_words(e->ev)[w], bit, __ATOMIC_SEQ_CST) & bit)) {
                kick(e->ev, e->wake, to, port);   /* bound to another vCPU: hand it over */
                n_fwd++;
            }
        }
    }
    if (n > before || n_fwd) {
        d->empty = d->strikes = 0;
    } else if (++d->empty >= XMP_EMPTY_LIMIT) {
        d->empty = 0;
        d->muted_until = now_ns() + (XMP_MUTE_NS << (d->strikes < 7 ? d->strikes : 7));
        d->strikes++;
    }
    return n;
}

/* The guest's upcall handler: clear upcall_pending first, then take the
 * selector and harvest pending & ~mask, clearing each pending bit as it is
 * taken (as Linux's xen_evtchn_do_upcall does), then the doorbells.
 * Masked ports stay pending.  Returns the number of ports written, or
 * XMP_SCAN_RESYNC (taking nothing) when the supervisor changed the set of
 * doorbells since dbs[] was built: the caller fetches it and scans again. */
#define XMP_SCAN_RESYNC 0xFFFFFFFFu
uint32_t xmp_evtchn_scan(xmp_evtchn_t *e, uint32_t vcpu, uint32_t *ports, uint32_t max)
{
    uint8_t *ev = e->ev;
    if (vcpu >= XMP_MAX_VCPUS)
        return 0;
    if (vcpu == 0 && LOAD_ACQ(&upcall(ev, 0)->db_gen) != e->seen_gen)
        return XMP_SCAN_RESYNC;
    xmp_vcpu_info_t *vi = vcpu_info(ev, vcpu);
    uint32_t n = 0;
    __atomic_store_n(&vi->evtchn_upcall_pending, 0, __ATOMIC_SEQ_CST);
    uint64_t sel = __atomic_exchange_n(&vi->evtchn_pending_sel, 0, __ATOMIC_SEQ_CST);
    while (sel) {
        uint32_t w = (uint32_t)__builtin_ctzll(sel);
        sel &= sel - 1;
        uint64_t live = LOAD_ACQ(&pending_words(ev)[w]) & ~LOAD_ACQ(&mask_words(ev)[w]);
        while (live) {
            uint32_t b = (uint32_t)__builtin_ctzll(live);
            live &= live - 1;
            if (notify_vcpu(ev, w * 64 + b) != vcpu)
                continue;   /* another vCPU's port: its own selector bit tells it */
            if (n == max) {
                /* out of room: leave the rest pending and come back */
                __atomic_fetch_or(&vi->evtchn_pending_sel, (1ULL << w) | sel, __ATOMIC_SEQ_CST);
                __atomic_store_n(&vi->evtchn_upcall_pending, 1, __ATOMIC_SEQ_CST);
                return n;
            }
            uint64_t bit = 1ULL << b;
            if (__atomic_fetch_and(&pending_words(ev)[w], ~bit, __ATOMIC_SEQ_CST) & bit)
                ports[n++] = w * 64 + b;
        }
    }
    for (uint32_t i = 0; vcpu == 0 && i < e->nr_dbs; i++) {
        n = scan_doorbell(e, &e->dbs[i], vcpu, ports, n, max);
        if (n > max) {
            __atomic_store_n(&vi->evtchn_upcall_pending, 1, __ATOMIC_SEQ_CST);
            return max;
        }
    }
    return n;
}

#define WAIT_EVENT 1
#define WAIT_TIMEOUT 0
#define WAIT_SHUTDOWN 2

static inline int news(xmp_evtchn_t *e, uint32_t vcpu)
{
    if (LOAD_ACQ(&upcall(e->ev, vcpu)->shutdown))
        return WAIT_SHUTDOWN;
    if (LOAD_ACQ(&vcpu_info(e->ev, vcpu)->evtchn_upcall_pending))
        return WAIT_EVENT;
    for (uint32_t i = 0; vcpu == 0 && i < e->nr_dbs; i++)
        if (__atomic_load_n(db_summary(e->dbs[i].db, vcpu), __ATOMIC_SEQ_CST) && !muted(&e->dbs[i]))
            return WAIT_EVENT;
    return -1;
}

/* Block the vCPU until an upcall is pending (privately or in a doorbell),
 * the timeout passes, or a shutdown is requested.  It first polls for up
 * to spin_ns (a futex wake-up costs tens of microseconds across cores; a
 * poll answers in well under one), then sleeps, so an idle domain uses no
 * CPU.  timeout_ns < 0 waits forever. */
int xmp_evtchn_wait(xmp_evtchn_t *e, uint32_t vcpu, int64_t timeout_ns, int64_t spin_ns)
{
    if (vcpu >= XMP_MAX_VCPUS)
        return -EINVAL;
    uint32_t *w = wake_word(e->wake, vcpu);
    int64_t start = now_ns();
    int64_t deadline = timeout_ns < 0 ? INT64_MAX : start + timeout_ns;
    int r;
    if (spin_ns > 0) {
        int64_t spin_end = start + spin_ns;
        if (spin_end > deadline)
            spin_end = deadline;
        for (uint32_t i = 0;; i++) {
            if ((r = news(e, vcpu)) >= 0)
                return r;
            if ((i & 63) == 63) {
                if (now_ns() >= spin_end)
                    break;
                /* If the sender shares our CPU, spinning only burns its
                 * time slice: let it run (a no-op when the CPU is ours). */
                sched_yield();
            }
            cpu_relax();
        }
    }
    struct futex_waitv fw[XMP_WAITV_MAX];
    for (;;) {
        /* Read every kick word, say we sleep, then look again: a sender
         * that set its bit before seeing the flag is seen here; one after
         * it sees the flag, and its bump of a word read here makes the
         * wait return at once. */
        uint32_t nw = 0, overflow = 0;
        int64_t unmute = INT64_MAX;
        uint32_t *pk = &upcall(e->ev, vcpu)->kick;
        fw[nw++] = (struct futex_waitv){.val = LOAD_ACQ(pk), .uaddr = (uintptr_t)pk,
                                        .flags = XMP_FUTEX2_SIZE_U32};
        for (uint32_t i = 0; vcpu == 0 && i < e->nr_dbs; i++) {
            if (muted(&e->dbs[i])) {   /* not waited on: come back when it ends */
                if (e->dbs[i].muted_until < unmute)
                    unmute = e->dbs[i].muted_until;
                continue;
            }
            if (nw == XMP_WAITV_MAX) {
                overflow = 1;
                break;
            }
            uint32_t *k = db_kick(e->dbs[i].db, vcpu);
            fw[nw++] = (struct futex_waitv){.val = LOAD_ACQ(k), .uaddr = (uintptr_t)k,
                                            .flags = XMP_FUTEX2_SIZE_U32};
        }
        __atomic_store_n(w, 1, __ATOMIC_SEQ_CST);
        if ((r = news(e, vcpu)) >= 0) {
            __atomic_store_n(w, 0, __ATOMIC_RELAXED);
            return r;
        }
        int64_t t = now_ns();
        if (t >= deadline) {
            __atomic_store_n(w, 0, __ATOMIC_RELAXED);
            return WAIT_TIMEOUT;
        }
        int64_t until = deadline < unmute ? deadline : unmute;
        if (overflow && until - t > XMP_OVERFLOW_POLL_NS)
            until = t + XMP_OVERFLOW_POLL_NS;   /* doorbells not in fw[]: look again soon */
        struct timespec ts = {until / 1000000000LL, until % 1000000000LL};
        long rc = syscall(__NR_futex_waitv, fw, nw, 0, until == INT64_MAX ? NULL : &ts,
                          CLOCK_MONOTONIC);
        int err = rc < 0 ? errno : 0;
        __atomic_store_n(w, 0, __ATOMIC_RELAXED);
        if (rc < 0 && err != EINTR && err != ETIMEDOUT && err != EAGAIN)
            return -err;
        /* a wake may be stale or spurious (a sender may wake its own word): re-check */
    }
}

/* Make the waiter return WAIT_SHUTDOWN now and at every later wait. */
void xmp_evtchn_request_shutdown(xmp_evtchn_t *e, uint32_t vcpu)
{
    __atomic_store_n(&upcall(e->ev, vcpu)->shutdown, 1, __ATOMIC_SEQ_CST);
    wake_if_sleeping(e->ev, e->wake, vcpu);
}

/* ------------------------------------------------------------------ */
/* Benchmark floor: a raw process-shared semaphore ping-pong.          */
/* ------------------------------------------------------------------ */

/* Two sem_t at `area` (each 32-byte aligned slot of 64 bytes).  The
 * initiator posts 0 and waits on 1, `rounds` times; the responder mirrors.
 * With spin_ns > 0 each side first polls the semaphore with sem_trywait.
 * Writes each round trip's nanoseconds to `lat` when not NULL. */
int xmp_bench_sem_init(uint8_t *area)
{
    if (sem_init((sem_t *)area, 1, 0) || sem_init((sem_t *)(area + 64), 1, 0))
        return -errno;
    return 0;
}

void xmp_bench_sem_destroy(uint8_t *area)
{
    sem_destroy((sem_t *)area);
    sem_destroy((sem_t *)(area + 64));
}

static void sem_take(sem_t *s, int64_t spin_ns)
{
    if (spin_ns > 0) {
        int64_t end = now_ns() + spin_ns;
        for (uint32_t i = 0;; i++) {
            if (sem_trywait(s) == 0)
                return;
            if ((i & 63) == 63 && now_ns() >= end)
                break;
            cpu_relax();
        }
    }
    while (sem_wait(s) != 0 && errno == EINTR)
        ;
}

void xmp_bench_sem_pingpong(uint8_t *area, int initiator, uint32_t rounds, int64_t spin_ns,
                            int64_t *lat)
{
    sem_t *ping = (sem_t *)area, *pong = (sem_t *)(area + 64);
    for (uint32_t i = 0; i < rounds; i++) {
        if (initiator) {
            int64_t t0 = now_ns();
            sem_post(ping);
            sem_take(pong, spin_ns);
            if (lat)
                lat[i] = now_ns() - t0;
        } else {
            sem_take(ping, spin_ns);
            sem_post(pong);
        }
    }
}

/* ------------------------------------------------------------------ */
/* Process and memory facilities the hypervisor needs from the OS.     */
/* ------------------------------------------------------------------ */
#include <fcntl.h>
#include <linux/capability.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

/* Die with the parent (the supervisor, or the zygote that forked us). */
int xmp_set_pdeathsig(int sig)
{
    return prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) ? -errno : 0;
}

/* Non-dumpable: other processes of the same user cannot ptrace us or open
 * our /proc/<pid>/{mem,fd,maps,environ}. */
int xmp_set_dumpable(int on)
{
    return prctl(PR_SET_DUMPABLE, on ? 1 : 0, 0, 0, 0) ? -errno : 0;
}

int xmp_set_comm(const char *name)
{
    return prctl(PR_SET_NAME, (unsigned long)name, 0, 0, 0) ? -errno : 0;
}

/* Give pages back to the host (ballooning, decrease_reservation). */
int xmp_punch_hole(int fd, int64_t offset, int64_t len)
{
    return fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, len) ? -errno : 0;
}

/* A guest process keeps no OS privilege: even running as root it must not
 * read a sibling's /proc/<pid>/mem (CAP_SYS_PTRACE), open others' files
 * (CAP_DAC_OVERRIDE), or regain anything through exec.  Bounding set first
 * (needs CAP_SETPCAP, which we still hold), then every set emptied. */
int xmp_drop_privileges(void)
{
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))
        return -errno;
    for (int cap = 0; cap <= 63; cap++)
        prctl(PR_CAPBSET_DROP, cap, 0, 0, 0);   /* EINVAL past the last cap; EPERM when unprivileged */
    prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0);
    struct __user_cap_header_struct hdr = {_LINUX_CAPABILITY_VERSION_3, 0};
    struct __user_cap_data_struct data[2];
    memset(data, 0, sizeof(data));
    if (syscall(SYS_capset, &hdr, data))
        return -errno;
    return 0;
}

/* As xmp_drop_privileges, but the capabilities in `keep` (a bit per
 * CAP_*) stay permitted and effective -- a network driver domain keeps
 * CAP_NET_ADMIN over the network namespace of its own it was given. */
int xmp_drop_privileges_but(unsigned long long keep)
{
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))
        return -errno;
    for (int cap = 0; cap <= 63; cap++)
        if (!(keep & (1ULL << cap)))
            prctl(PR_CAPBSET_DROP, cap, 0, 0, 0);
    prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0);
    struct __user_cap_header_struct hdr = {_LINUX_CAPABILITY_VERSION_3, 0};
    struct __user_cap_data_struct data[2];
    memset(data, 0, sizeof(data));
    data[0].effective = data[0].permitted = (uint32_t)keep;
    data[1].effective = data[1].permitted = (uint32_t)(keep >> 32);
    if (syscall(SYS_capset, &hdr, data))
        return -errno;
    return 0;
}
