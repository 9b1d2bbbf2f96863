/*
 * Log-dirty mode (Xen's XEN_DOMCTL_SHADOW_OP_{ENABLE_LOGDIRTY,CLEAN,PEEK})
 * for a domain's RAM, two ways:
 *
 *  1. userfaultfd write-protect in asynchronous mode (UFFD_FEATURE_WP_ASYNC,
 *     Linux 6.7+) over the guest process's own mapping of its RAM, read and
 *     re-armed with PAGEMAP_SCAN on /proc/PID/pagemap.  A write through that
 *     mapping clears the page's write-protect bit in the kernel, without a
 *     fault handler; PAGEMAP_SCAN with PM_SCAN_WP_MATCHING reports the
 *     written pages and write-protects them again in one atomic walk, so a
 *     write racing the scan lands in this round or the next, never nowhere.
 *     It tracks only the mapping it is registered on: writes made through
 *     other processes' mappings of the same shm (dom0's grant mappings) are
 *     marked by the hypervisor, as Xen marks them on unmap.
 *
 *  2. page hashing, when userfaultfd is unavailable: a 64-bit hash per page,
 *     compared with the previous round's.  It sees every writer (it reads
 *     the memory itself) but costs a pass over all of RAM per round.
 *
 * Bitmaps are Xen's dirty bitmap layout: bit (pfn & 7) of byte pfn >> 3,
 * which is the little-endian unsigned long array libxc hands to shadow_op.
 * Both scans OR into the bitmap and return how many bits they set there.
 */
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#ifndef UFFD_FEATURE_WP_UNPOPULATED
#define UFFD_FEATURE_WP_UNPOPULATED (1 << 13)
#endif
#ifndef UFFD_FEATURE_WP_ASYNC
#define UFFD_FEATURE_WP_ASYNC (1 << 15)
#endif
#ifndef UFFD_USER_MODE_ONLY
#define UFFD_USER_MODE_ONLY 1
#endif
#ifndef USERFAULTFD_IOC_NEW
#define USERFAULTFD_IOC_NEW _IO(0xAA, 0x00)
#endif

/* linux/fs.h (6.7+); this machine's headers predate it. */
#ifndef PAGEMAP_SCAN
struct page_region { uint64_t start, end, categories; };
struct pm_scan_arg {
    uint64_t size, flags, start, end, walk_end, vec, vec_len, max_pages;
    uint64_t category_inverted, category_mask, category_anyof_mask, return_mask;
};
#define PAGE_IS_WPALLOWED (1 << 0)
#define PAGE_IS_WRITTEN (1 << 1)
#define PM_SCAN_WP_MATCHING (1 << 0)
#define PM_SCAN_CHECK_WPASYNC (1 << 1)
#define PAGEMAP_SCAN _IOWR('f', 16, struct pm_scan_arg)
#endif

#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434
#endif
#ifndef SYS_pidfd_getfd
#define SYS_pidfd_getfd 438
#endif

#define LD_PAGE 4096u
#define LD_REGIONS 512

/* A userfaultfd for the calling process, handshaken for WP_ASYNC.  Through
 * /dev/userfaultfd first (its file mode is the access control), then the
 * syscall (which needs CAP_SYS_PTRACE while vm.unprivileged_userfaultfd is
 * 0).  UFFD_USER_MODE_ONLY: the guest keeps a reference, and a userfaultfd
 * that could stall the kernel's own accesses (copy_from_user) is the
 * classic exploit primitive seccomp denies guests; WP_ASYNC never hands a
 * fault to a handler, so it loses nothing.  Returns the descriptor or -errno. */
int xmp_uffd_open(void)
{
    int fd = -1, err = 0;
    int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
    if (dev >= 0) {
        fd = ioctl(dev, USERFAULTFD_IOC_NEW, O_CLOEXEC | O_NONBLOCK | UFFD_USER_MODE_ONLY);
        err = errno;
        close(dev);
    }
    if (fd < 0) {
        fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK | UFFD_USER_MODE_ONLY);
        if (fd < 0)
            return -(err ? err : errno);
    }
    struct uffdio_api api = {.api = UFFD_API,
                             .features = UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_HUGETLBFS_SHMEM |
                                         UFFD_FEATURE_WP_UNPOPULATED};
    if (ioctl(fd, UFFDIO_API, &api)) {
        err = errno;
        close(fd);
        return -err;
    }
    return fd;
}

/* A duplicate of descriptor ``target`` of process ``pid`` (pidfd_getfd,
 * which needs ptrace access to it).  Returns the descriptor or -errno. */
int xmp_pidfd_getfd(int pid, int target)
{
    int pidfd = (int)syscall(SYS_pidfd_open, pid, 0);
    if (pidfd < 0)
        return -errno;
    int fd = (int)syscall(SYS_pidfd_getfd, pidfd, target, 0);
    int err = errno;
    close(pidfd);
    return fd < 0 ? -err : fd;
}

/* Register [start, start+len) of the uffd's process for write-protect and
 * arm it.  The ioctls act on the process that created the uffd, whoever
 * calls them. */
int xmp_uffd_wp_start(int uffd, uint64_t start, uint64_t len)
{
    struct uffdio_register reg = {.range = {start, len}, .mode = UFFDIO_REGISTER_MODE_WP};
    if (ioctl(uffd, UFFDIO_REGISTER, &reg))
        return -errno;
    struct uffdio_writeprotect wp = {.range = {start, len}, .mode = UFFDIO_WRITEPROTECT_MODE_WP};
    if (ioctl(uffd, UFFDIO_WRITEPROTECT, &wp))
        return -errno;
    return 0;
}

int xmp_uffd_wp_stop(int uffd, uint64_t start, uint64_t len)
{
    struct uffdio_range range = {start, len};
    return ioctl(uffd, UFFDIO_UNREGISTER, &range) ? -errno : 0;
}

static inline int64_t ld_set(uint8_t *bitmap, uint64_t pfn)
{
    uint8_t bit = (uint8_t)(1u << (pfn & 7));
    if (bitmap[pfn >> 3] & bit)
        return 0;
    bitmap[pfn >> 3] |= bit;
    return 1;
}

/* The written pages of [start, start + npages pages) of the process whose
 * /proc/PID/pagemap ``pagemap_fd`` is, as pfns from 0, into ``bitmap``;
 * ``clean`` write-protects them again in the same walk (CLEAN), else they
 * stay written (PEEK).  A page of the range that is not armed (the guest
 * unmapped or replaced its RAM mapping) ends the scan with -EPERM: the
 * caller must then treat every page as dirty. */
int64_t xmp_logdirty_scan(int pagemap_fd, uint64_t start, uint64_t npages, int clean, uint8_t *bitmap)
{
    struct page_region regions[LD_REGIONS];
    uint64_t end = start + npages * LD_PAGE, at = start;
    int64_t set = 0;
    while (at < end) {
        struct pm_scan_arg arg = {
            .size = sizeof(arg),
            .flags = PM_SCAN_CHECK_WPASYNC | (clean ? PM_SCAN_WP_MATCHING : 0),
            .start = at,
            .end = end,
            .vec = (uint64_t)(uintptr_t)regions,
            .vec_len = LD_REGIONS,
            .category_mask = PAGE_IS_WRITTEN,
            .return_mask = PAGE_IS_WRITTEN,
        };
        long n = ioctl(pagemap_fd, PAGEMAP_SCAN, &arg);
        if (n < 0)
            return -errno;
        for (long i = 0; i < n; i++)
            for (uint64_t a = regions[i].start; a < regions[i].end; a += LD_PAGE)
                set += ld_set(bitmap, (a - start) / LD_PAGE);
        if (arg.walk_end <= at)  /* no progress: never loop forever on a kernel surprise */
            return -EIO;
        at = arg.walk_end;
    }
    return set;
}

/* A 64-bit hash of one page: four independent multiply-rotate lanes over
 * 8-byte words (so the loop runs at memory speed), folded at the end.  Not
 * cryptographic: a change is missed only if it collides in 64 bits. */
static uint64_t ld_hash_page(const uint8_t *p)
{
    const uint64_t k = 0x9E3779B97F4A7C15ull;
    uint64_t h0 = 1, h1 = 2, h2 = 3, h3 = 4;
    for (unsigned i = 0; i < LD_PAGE; i += 32) {
        uint64_t w[4];
        memcpy(w, p + i, sizeof(w));
        h0 = ((h0 ^ w[0]) * k);
        h1 = ((h1 ^ w[1]) * k);
        h2 = ((h2 ^ w[2]) * k);
        h3 = ((h3 ^ w[3]) * k);
        h0 = (h0 << 31) | (h0 >> 33);
        h1 = (h1 << 29) | (h1 >> 35);
        h2 = (h2 << 27) | (h2 >> 37);
        h3 = (h3 << 23) | (h3 >> 41);
    }
    uint64_t h = h0 ^ (h1 * k) ^ ((h2 * k) * k) ^ (((h3 * k) * k) * k);
    h ^= h >> 32;
    return h * k;
}

/* Hash pages [first, first + n) of ``mem`` whose ``populated`` byte is set
 * (reading an unpopulated page of shm would allocate it) and compare with
 * ``hashes``: a page whose hash changed is set in ``bitmap``; ``clean``
 * stores the new hashes.  A page that is not populated stores hash 0, so
 * populating it later reports it. */
int64_t xmp_hash_scan(const uint8_t *mem, const uint8_t *populated, uint64_t first, uint64_t n,
                      uint64_t *hashes, int clean, uint8_t *bitmap)
{
    int64_t set = 0;
    for (uint64_t pfn = first; pfn < first + n; pfn++) {
        uint64_t h = populated[pfn] ? ld_hash_page(mem + pfn * LD_PAGE) | 1 : 0;
        if (h != hashes[pfn]) {
            set += ld_set(bitmap, pfn - first);
            if (clean)
                hashes[pfn] = h;
        }
    }
    return set;
}
