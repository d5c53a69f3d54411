/* Loads the kernel programs of bpf/process.bpf.c (libbpf skeleton), gives
 * their ring buffer to a tapio_rings reader (tapio_rings.h), and reads their
 * drop counters. A thin layer for the agent: per-record work stays in C,
 * decisions stay in Swift.
 *
 * Threads: the tapio_bpf_program_*() getters, tapio_bpf_read_drops() and
 * tapio_bpf_log() from any thread; tapio_bpf_close() after all others have
 * returned.
 *
 * libbpf messages: debug output is discarded. Warnings and info printed while
 * tapio_bpf_open() runs are kept with the object (tapio_bpf_log()) or, when
 * the open fails, appended to its error message; at any other time they go to
 * stderr. libbpf's print hook is process-wide: this library owns it.
 */
#ifndef TAPIO_BPF_H
#define TAPIO_BPF_H

#include <stddef.h>
#include <stdint.h>

#include "tapio_events.h"
#include "tapio_counters.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct tapio_bpf tapio_bpf;

typedef struct {
	uint64_t cgroup_root_id;      /* 0 = every cgroup */
	uint32_t cgroup_root_level;   /* depth of that cgroup below the cgroup2 root (root = 0) */
	uint32_t kinds_disabled_mask; /* bit (1u << kind) turns a kind off */
	uint32_t ringbuf_bytes;       /* 0 = default (4 MiB); power of two, multiple of page size */
	/* Adaptive wakeup fill mark (bpf/common.bpf.h): 0 = default (1/16 of
	 * the ring), UINT32_MAX = the kernel's default wakeups. */
	uint32_t wakeup_bytes;
	/* Benchmark only: turns on tapio_bench_storm for tasks of this comm
	 * (bench/, `make bench`). NULL or "": not loaded. */
	const char *bench_comm;
} tapio_bpf_config;

/* The fill mark a loader sets for a ring of ring_bytes given the configured
 * value (see wakeup_bytes above); 0 means the kernel's default wakeups. */
uint64_t tapio_wakeup_mark(uint32_t configured, uint32_t ring_bytes);

/* Called for every ring buffer record (tapio_rings_poll(), and the DNS and
 * net objects' folded records). Return 0 to continue; anything else ends the
 * current call after this record (which counts as consumed). */
typedef int (*tapio_bpf_event_fn)(void *ctx, const struct tapio_event *event);

/* Mounts tracefs where libbpf looks for tracepoint ids (/sys/kernel/tracing,
 * or /sys/kernel/debug/tracing when that path exists) if it is not mounted
 * yet. Call before tapio_bpf_open(). 0 or -errno. */
int tapio_bpf_ensure_tracefs(void);

/* Opens, sets the const volatile config, loads, and attaches each program
 * individually. A program that fails to attach is recorded as degraded; a
 * program whose kind is disabled in the config is not loaded and is recorded
 * the same way. The object fails only if loading fails or nothing attaches:
 * then NULL, and a message in err (the libbpf log, e.g. the verifier's, is
 * appended as far as err_len allows; 4096 bytes holds the useful part). */
tapio_bpf *tapio_bpf_open(const tapio_bpf_config *config, char *err, size_t err_len);

int tapio_bpf_program_count(const tapio_bpf *bpf);
/* The BPF program's name, e.g. "handle_exec"; NULL for a bad index. */
const char *tapio_bpf_program_name(const tapio_bpf *bpf, int index);
/* Stable name of what the program provides: "process_exec", "process_exit",
 * "oom_kill". NULL for a bad index. */
const char *tapio_bpf_program_capability(const tapio_bpf *bpf, int index);
/* 1 when attached, 0 otherwise (or for a bad index). */
int tapio_bpf_program_attached(const tapio_bpf *bpf, int index);
/* Why the program is degraded, or "" when attached. NULL for a bad index. */
const char *tapio_bpf_program_error(const tapio_bpf *bpf, int index);
/* libbpf warnings printed while this object was opened, "" when none. */
const char *tapio_bpf_log(const tapio_bpf *bpf);

/* The process object's ring buffer map, for a tapio_rings reader. */
int tapio_bpf_events_fd(const tapio_bpf *bpf);
uint32_t tapio_bpf_ringbuf_bytes(const tapio_bpf *bpf);

/* Sums the per-CPU drop counters: out[kind * TAPIO_DROP_REASON_MAX + reason].
 * Fills min(slots, TAPIO_KIND_MAX * TAPIO_DROP_REASON_MAX) slots and zeroes
 * the rest. Counters only grow. 0 or -errno. */
int tapio_bpf_read_drops(tapio_bpf *bpf, uint64_t *out, size_t slots);

/* Detaches and unloads everything. NULL is ignored. */
void tapio_bpf_close(tapio_bpf *bpf);

/* cgroup v2 id and depth of a cgroup2 directory: id is the directory's
 * kernfs node id (its inode number), level the number of path components
 * below the cgroup2 root, counting the mount's own root within the hierarchy
 * (a bind mount of a subtree is handled). A cgroup2 mount made inside a
 * cgroup namespace shows only the namespace's part of the hierarchy, so the
 * level is too small there: the agent must see the host's cgroup2 mount.
 * 0, -EINVAL when the directory is not on cgroup2, or another -errno. */
int tapio_bpf_cgroup_id(const char *cgroup2_dir, uint64_t *id, uint32_t *level);

/* CLOCK_MONOTONIC and CLOCK_REALTIME in ns, sampled back to back: of three
 * tries, the realtime reading with the closest pair of monotonic readings
 * around it, paired with their midpoint. realtime - monotonic converts an
 * event's ts_ns to wall time. */
void tapio_bpf_clock_pair(int64_t *monotonic_ns, int64_t *realtime_ns);

#ifdef __cplusplus
}
#endif

#endif
