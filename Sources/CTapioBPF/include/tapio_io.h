/* io_error: the kernel side (bpf/io.bpf.c) folds failed storage syscalls into
 * a hash map; this loader harvests it every interval. The key and value
 * structs are ABI shared with the BPF program. */
#ifndef TAPIO_IO_H
#define TAPIO_IO_H

#include "tapio_events.h"

/* Per generation: the kernel keeps two maps of this size (double buffering). */
#define TAPIO_IO_MAX_KEYS 4096

struct tapio_io_key {
	__u64 cgroup_id;
	__u32 pid;
	__u32 syscall_nr;
	__s32 error;   /* positive errno */
	__u32 _pad;
};

struct tapio_io_value {
	__u64 count;
	__u64 first_ns; /* CLOCK_MONOTONIC */
	__u64 last_ns;
	__u32 uid;
	__u32 _pad;
	__u8 comm[TAPIO_COMM_LEN];
};

#ifndef __TAPIO_BPF__
#include <stddef.h>
#include "tapio_aggregate.h"
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct tapio_io_loader tapio_io_loader;

typedef struct {
	uint64_t cgroup_root_id;    /* 0 = every cgroup */
	uint32_t cgroup_root_level;
} tapio_io_config;

/* Each harvested aggregate is a struct tapio_aggregate (tapio_aggregate.h)
 * of kind TAPIO_KIND_IO_ERROR: `count` failures of `syscall` with `error` by
 * one process (pid, uid, comm, cgroup_id) in the interval. */

/* Opens, loads and attaches raw_syscalls/sys_exit, and registers the storage
 * syscalls of this architecture. NULL with a message in err on failure (the
 * agent then reports io_error as degraded). */
tapio_io_loader *tapio_io_open(const tapio_io_config *config, char *err, size_t err_len);
/* Moves every aggregate out of the kernel map into fn. Returns how many, or -errno.
 * Exact: the map is double buffered; the harvest switches the program to the
 * other generation, waits (at most 1 s, normally microseconds) until it no
 * longer adds to the retired one, and empties that. What a timeout or fn
 * returning non-zero leaves behind is delivered by the next harvest. */
int tapio_io_harvest(tapio_io_loader *io, tapio_aggregate_fn fn, void *ctx);
/* Cumulative drops (map full), as tapio_bpf_read_drops. */
int tapio_io_read_drops(tapio_io_loader *io, uint64_t *out, size_t slots);
void tapio_io_close(tapio_io_loader *io);

#ifdef __cplusplus
}
#endif
#endif /* !__TAPIO_BPF__ */

#endif
