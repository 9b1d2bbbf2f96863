"""cffi (API mode) build of xmp's C fast path, ``xmp.sharedmem._fast``.

Run by setuptools during ``pip install`` (see setup.py); the declarations
below are the whole C interface Python may call.
"""

from pathlib import Path

from cffi import FFI

CDEF = """
typedef struct {
    uint8_t *sring;
    uint32_t nr_ents;
    uint32_t slot_size;
    uint32_t prod_pvt;
    uint32_t cons;
    int back;
} xmp_ring_t;

uint32_t xmp_load32(const uint32_t *p);
void xmp_store32(uint32_t *p, uint32_t v);
void xmp_mb(void);

void xmp_ring_init_shared(uint8_t *sring);
uint32_t xmp_ring_free(const xmp_ring_t *r);
int64_t xmp_ring_unconsumed(const xmp_ring_t *r);
uint32_t xmp_ring_put(xmp_ring_t *r, const uint8_t *src, uint32_t n, uint32_t msg_size);
int xmp_ring_push(xmp_ring_t *r);
int64_t xmp_ring_get(xmp_ring_t *r, uint8_t *dst, uint32_t max, uint32_t msg_size);
int64_t xmp_ring_final_check(xmp_ring_t *r);
void xmp_ring_set_event(xmp_ring_t *r, uint32_t value);

int64_t xmp_bytering_write(uint8_t *data, uint32_t size, uint32_t *cons_p,
                           uint32_t *prod_p, const uint8_t *src, uint32_t len);
int64_t xmp_bytering_read(uint8_t *data, uint32_t size, uint32_t *cons_p,
                          uint32_t *prod_p, uint8_t *dst, uint32_t len);

typedef struct { uint16_t flags; uint16_t domid; uint32_t frame; } xmp_grant_entry_t;
typedef struct xmp_active_table xmp_active_table_t;
typedef struct {
    uint8_t *mem;
    uint64_t mem_len;
    xmp_grant_entry_t *tab;
    uint32_t nr;
    xmp_active_table_t *act;
    uint32_t ref;
    uint32_t offset;
} xmp_copy_ptr_t;

xmp_active_table_t *xmp_active_new(uint32_t nr);
void xmp_active_free(xmp_active_table_t *t);
uint32_t xmp_active_pins(xmp_active_table_t *t, uint32_t ref, int writers);
void xmp_gnttab_grant(xmp_grant_entry_t *tab, uint32_t ref, uint16_t domid,
                      uint32_t frame, int readonly);
int xmp_gnttab_end_access(xmp_grant_entry_t *tab, uint32_t ref);
int xmp_gnttab_make_readonly(xmp_grant_entry_t *tab, uint32_t ref);
uint32_t xmp_gnttab_map(xmp_grant_entry_t *tab, uint32_t nr, xmp_active_table_t *act,
                        const uint32_t *refs, uint32_t n, uint16_t mapper, int readonly,
                        uint64_t frame_limit, uint32_t *frames, int16_t *statuses);
void xmp_gnttab_unmap(xmp_grant_entry_t *tab, xmp_active_table_t *act,
                      const uint32_t *refs, uint32_t n, int readonly);
int xmp_gnttab_copy(xmp_copy_ptr_t *src, xmp_copy_ptr_t *dst, uint32_t len, uint16_t caller);
void xmp_gnttab_copy_batch(xmp_copy_ptr_t *src, xmp_copy_ptr_t *dst, const uint32_t *len,
                           int16_t *status, uint32_t n, uint16_t caller);
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
typedef struct {
    uint16_t domid;
    uint8_t *mem;
    uint64_t mem_len;
    xmp_grant_entry_t *tab;
    uint32_t nr;
    xmp_active_table_t *act;
} xmp_copy_dom_t;
uint32_t xmp_gnttab_copy_domids(const xmp_gnttab_copy_t *ops, uint32_t n, uint16_t caller,
                                uint16_t *out, uint32_t max);
void xmp_gnttab_copy_ops(xmp_gnttab_copy_t *ops, uint32_t n, uint16_t caller,
                         const xmp_copy_dom_t *doms, uint32_t ndoms);
void xmp_gnttab_copy_status_out(uint8_t *dst, const xmp_gnttab_copy_t *ops, uint32_t n);

typedef struct {
    uint8_t *db;
    uint32_t owner;
    uint32_t empty;
    int64_t muted_until;
    uint32_t strikes;
    uint32_t pad;
} xmp_doorbell_ref_t;
typedef struct {
    uint8_t *ev;
    uint32_t *wake;
    xmp_doorbell_ref_t *dbs;
    uint32_t nr_dbs;
    uint32_t seen_gen;
} xmp_evtchn_t;

uint32_t xmp_evtchn_sizeof_upcall(void);
int xmp_evtchn_init(uint8_t *ev, uint32_t nr_vcpus);
void xmp_evtchn_destroy(uint8_t *ev, uint32_t nr_vcpus);
int xmp_evtchn_send(xmp_evtchn_t *e, uint32_t port, uint32_t vcpu);
int xmp_doorbell_send(uint8_t *db, const uint32_t *wake, uint32_t port, uint32_t vcpu);
void xmp_evtchn_set_owner(uint8_t *ev, uint32_t port, uint32_t owner);
int xmp_evtchn_set_vcpu(xmp_evtchn_t *e, uint32_t port, uint32_t vcpu);
void xmp_evtchn_bump_gen(xmp_evtchn_t *e, uint32_t nr_vcpus);
void xmp_evtchn_kick(xmp_evtchn_t *e, uint32_t vcpu);
uint32_t xmp_evtchn_db_gen(const xmp_evtchn_t *e);
void xmp_evtchn_mask(xmp_evtchn_t *e, uint32_t port);
int xmp_evtchn_unmask(xmp_evtchn_t *e, uint32_t port, uint32_t vcpu);
void xmp_evtchn_clear(xmp_evtchn_t *e, uint32_t port);
int xmp_evtchn_is_pending(xmp_evtchn_t *e, uint32_t port);
int xmp_evtchn_is_masked(xmp_evtchn_t *e, uint32_t port);
uint32_t xmp_evtchn_scan(xmp_evtchn_t *e, uint32_t vcpu, uint32_t *ports, uint32_t max);
int xmp_evtchn_wait(xmp_evtchn_t *e, uint32_t vcpu, int64_t timeout_ns, int64_t spin_ns);
void xmp_evtchn_request_shutdown(xmp_evtchn_t *e, uint32_t vcpu);

int xmp_set_pdeathsig(int sig);
int xmp_set_dumpable(int on);
int xmp_set_comm(const char *name);
int xmp_punch_hole(int fd, int64_t offset, int64_t len);
int xmp_drop_privileges(void);
int xmp_drop_privileges_but(unsigned long long keep);

int xmp_bench_sem_init(uint8_t *area);
void xmp_bench_sem_destroy(uint8_t *area);
void xmp_bench_sem_pingpong(uint8_t *area, int initiator, uint32_t rounds, int64_t spin_ns,
                            int64_t *lat);

int xmp_uffd_open(void);
int xmp_pidfd_getfd(int pid, int target);
int xmp_uffd_wp_start(int uffd, uint64_t start, uint64_t len);
int xmp_uffd_wp_stop(int uffd, uint64_t start, uint64_t len);
int64_t xmp_logdirty_scan(int pagemap_fd, uint64_t start, uint64_t npages, int clean, uint8_t *bitmap);
int64_t xmp_hash_scan(const uint8_t *mem, const uint8_t *populated, uint64_t first, uint64_t n,
                      uint64_t *hashes, int clean, uint8_t *bitmap);

uint8_t xmp_vchan_fetch_or8(uint8_t *p, uint8_t bits);
uint8_t xmp_vchan_fetch_and8(uint8_t *p, uint8_t bits);
uint8_t xmp_vchan_load8(const uint8_t *p);
void xmp_vchan_store8(uint8_t *p, uint8_t v);
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
_here = Path(__file__).parent
# logdirty.c is log-dirty tracking (migration's), kept apart from the ring and
# event-channel fast path, and vchan.c is libxenvchan's notify bytes
# (xmp.libs.vchan); one extension holds them all.
ffibuilder.set_source(
    "xmp.sharedmem._fast",
    "\n".join((_here / name).read_text() for name in ("fast.c", "logdirty.c", "vchan.c")),
    extra_compile_args=["-O2", "-std=gnu11", "-Wall"],
    libraries=["pthread"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
