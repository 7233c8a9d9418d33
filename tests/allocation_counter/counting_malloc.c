/* A malloc that counts: loaded with LD_PRELOAD, it wraps glibc's allocator and keeps the bytes
 * live now and their peak since the last reset, so that a process can measure what one call
 * allocates, whoever allocates it (torch's CPU allocator, operator new, std::vector, BLAS).
 * Sizes are malloc_usable_size, so a free subtracts exactly what its allocation added. */
#define _GNU_SOURCE
#include <malloc.h>
#include <stddef.h>
#include <stdint.h>

extern void *__libc_malloc(size_t);
extern void *__libc_calloc(size_t, size_t);
extern void *__libc_realloc(void *, size_t);
extern void *__libc_memalign(size_t, size_t);
extern void __libc_free(void *);

static int64_t live_bytes;
static int64_t peak_bytes;

static void *counted(void *p) {
  if (p) {
    int64_t now = __atomic_add_fetch(&live_bytes, (int64_t)malloc_usable_size(p), __ATOMIC_RELAXED);
    int64_t peak = __atomic_load_n(&peak_bytes, __ATOMIC_RELAXED);
    while (now > peak &&
           !__atomic_compare_exchange_n(&peak_bytes, &peak, now, 1, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
    }
  }
  return p;
}

static void uncount(void *p) {
  if (p) __atomic_sub_fetch(&live_bytes, (int64_t)malloc_usable_size(p), __ATOMIC_RELAXED);
}

void *malloc(size_t size) { return counted(__libc_malloc(size)); }
void *calloc(size_t count, size_t size) { return counted(__libc_calloc(count, size)); }
void free(void *p) {
  uncount(p);
  __libc_free(p);
}
void *realloc(void *p, size_t size) {
  /* Uncounted first: after a successful realloc the old block may be gone. If realloc fails
   * the old block is still live, so it is counted again. */
  uncount(p);
  void *moved = __libc_realloc(p, size);
  if (moved == NULL && size != 0) return counted(p);
  return counted(moved);
}
void *memalign(size_t alignment, size_t size) { return counted(__libc_memalign(alignment, size)); }
void *aligned_alloc(size_t alignment, size_t size) { return memalign(alignment, size); }
int posix_memalign(void **out, size_t alignment, size_t size) {
  void *p = memalign(alignment, size);
  if (p == NULL && size != 0) return 12; /* ENOMEM */
  *out = p;
  return 0;
}
void *valloc(size_t size) { return memalign(4096, size); }

/* Read from Python through ctypes. */
int64_t counting_malloc_live_bytes(void) { return __atomic_load_n(&live_bytes, __ATOMIC_RELAXED); }
int64_t counting_malloc_peak_bytes(void) { return __atomic_load_n(&peak_bytes, __ATOMIC_RELAXED); }
void counting_malloc_reset_peak(void) {
  __atomic_store_n(&peak_bytes, __atomic_load_n(&live_bytes, __ATOMIC_RELAXED), __ATOMIC_RELAXED);
}
