/* One wait over every ring buffer the agent reads.
 *
 * Each BPF object (process, net, dns, ...) has its own ring buffer, so a
 * storm in one cannot starve another of space. The reader waits on all of
 * them at once (one epoll set) and then drains every ring, including the
 * records the programs submitted without a wakeup (adaptive wakeup,
 * bpf/common.bpf.h: below the fill mark a record does not wake the reader;
 * it is drained by the next wait's timeout or by a busier ring's wakeup).
 *
 * Threads: tapio_rings_poll() on one thread at a time; the getters from any
 * thread (counters are read without tearing on 64-bit machines).
 */
#ifndef TAPIO_RINGS_H
#define TAPIO_RINGS_H

#include <stddef.h>
#include <stdint.h>

#include "tapio_bpf.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct tapio_rings tapio_rings;

tapio_rings *tapio_rings_new(void);
/* Adds a BPF_MAP_TYPE_RINGBUF map. name says whose it is ("process", "dns");
 * size_bytes is its size, for reporting. The index of the ring, or -errno. */
int tapio_rings_add(tapio_rings *rings, int map_fd, const char *name, uint32_t size_bytes);
/* Waits up to timeout_ms (0: not at all, -1: forever) for a wakeup from any
 * ring, then delivers every record available in every ring to fn. Returns
 * the records delivered, or -errno; an interrupted wait delivers what is
 * there and is not an error. fn returning non-zero ends this call after that
 * record. */
int tapio_rings_poll(tapio_rings *rings, int timeout_ms, tapio_bpf_event_fn fn, void *ctx);
int tapio_rings_count(const tapio_rings *rings);
const char *tapio_rings_name(const tapio_rings *rings, int index);
uint32_t tapio_rings_size(const tapio_rings *rings, int index);
/* Records delivered from ring index so far. */
uint64_t tapio_rings_records(const tapio_rings *rings, int index);
/* Bytes of ring index written by the programs and not yet read (producer
 * minus consumer position, records being written included); 0 when the
 * positions could not be mapped. */
uint64_t tapio_rings_fill(const tapio_rings *rings, int index);
/* Wakeups (returns from the wait with a ring signalled) so far. */
uint64_t tapio_rings_wakeups(const tapio_rings *rings);
/* Frees the reader (not the maps, which belong to their objects). */
void tapio_rings_free(tapio_rings *rings);

#ifdef __cplusplus
}
#endif

#endif
