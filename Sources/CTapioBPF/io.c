/* Loader for bpf/io.bpf.c (io_error). See include/tapio_io.h. */
#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <sched.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>

#include <bpf/bpf.h>
#include <bpf/libbpf.h>

#include "tapio_io.h"
#include "generations.h"
#include "percpu.h"
#include "tapio_bpf.h"
#include "io.skel.h"

/* How long a harvest waits for the program to leave the generation it
 * retired (normally microseconds); after that the generation is emptied by
 * a later harvest, never early. */
#define TAPIO_IO_RETIRE_WAIT_NS 1000000000ull

struct tapio_io_loader {
	struct tapio_io *skel;
	/* Double buffering (see tapio_io_harvest()): the generation the
	 * program adds to, and whether the other one still holds entries. */
	uint32_t gen;
	bool retired_pending;
	/* CLOCK_MONOTONIC of the previous harvest (or the open): the interval
	 * the aggregates of the next one cover. */
	uint64_t harvested_ns;
	uint64_t harvest_ns;
};

static uint64_t tapio_io_now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* Storage syscalls of the architecture this agent was built for. */
static const struct {
	long nr;
	const char *name;
} tapio_io_syscalls[] = {
#ifdef SYS_write
	{SYS_write, "write"},
#endif
#ifdef SYS_pwrite64
	{SYS_pwrite64, "pwrite64"},
#endif
#ifdef SYS_writev
	{SYS_writev, "writev"},
#endif
#ifdef SYS_pwritev
	{SYS_pwritev, "pwritev"},
#endif
#ifdef SYS_pwritev2
	{SYS_pwritev2, "pwritev2"},
#endif
#ifdef SYS_fsync
	{SYS_fsync, "fsync"},
#endif
#ifdef SYS_fdatasync
	{SYS_fdatasync, "fdatasync"},
#endif
#ifdef SYS_sync_file_range
	{SYS_sync_file_range, "sync_file_range"},
#endif
#ifdef SYS_fallocate
	{SYS_fallocate, "fallocate"},
#endif
#ifdef SYS_open
	{SYS_open, "open"},
#endif
#ifdef SYS_openat
	{SYS_openat, "openat"},
#endif
#ifdef SYS_openat2
	{SYS_openat2, "openat2"},
#endif
#ifdef SYS_creat
	{SYS_creat, "creat"},
#endif
#ifdef SYS_mkdir
	{SYS_mkdir, "mkdir"},
#endif
#ifdef SYS_mkdirat
	{SYS_mkdirat, "mkdirat"},
#endif
#ifdef SYS_rename
	{SYS_rename, "rename"},
#endif
#ifdef SYS_renameat2
	{SYS_renameat2, "renameat2"},
#endif
#ifdef SYS_copy_file_range
	{SYS_copy_file_range, "copy_file_range"},
#endif
#ifdef SYS_sendfile
	{SYS_sendfile, "sendfile"},
#endif
#ifdef SYS_close
	{SYS_close, "close"},
#endif
};

static const char *tapio_io_syscall_name(uint32_t nr)
{
	size_t i;

	for (i = 0; i < sizeof(tapio_io_syscalls) / sizeof(tapio_io_syscalls[0]); i++)
		if ((uint32_t)tapio_io_syscalls[i].nr == nr)
			return tapio_io_syscalls[i].name;
	return "unknown";
}

tapio_io_loader *tapio_io_open(const tapio_io_config *config, char *err, size_t err_len)
{
	tapio_io_loader *io;
	size_t i;
	int rc;

	io = calloc(1, sizeof(*io));
	if (!io) {
		snprintf(err, err_len, "out of memory");
		return NULL;
	}
	io->harvested_ns = tapio_io_now();
	io->skel = tapio_io__open();
	if (!io->skel) {
		snprintf(err, err_len, "open io.bpf.o: %s", strerror(errno));
		free(io);
		return NULL;
	}
	io->skel->rodata->cgroup_root_id = config->cgroup_root_id;
	io->skel->rodata->cgroup_root_level = config->cgroup_root_level;
	/* This object never uses the shared ring buffer: keep it one page. */
	bpf_map__set_max_entries(io->skel->maps.events, 4096);
	rc = tapio_io__load(io->skel);
	if (rc) {
		snprintf(err, err_len, "load io.bpf.o: %s", strerror(-rc));
		goto fail;
	}
	if (!io->skel->bss) {
		snprintf(err, err_len, "load io.bpf.o: .bss not mmapped");
		goto fail;
	}
	for (i = 0; i < sizeof(tapio_io_syscalls) / sizeof(tapio_io_syscalls[0]); i++) {
		uint32_t nr = (uint32_t)tapio_io_syscalls[i].nr;
		uint8_t on = 1;

		rc = bpf_map_update_elem(bpf_map__fd(io->skel->maps.io_syscalls), &nr, &on, BPF_ANY);
		if (rc) {
			snprintf(err, err_len, "register syscall %s: %s", tapio_io_syscalls[i].name, strerror(errno));
			goto fail;
		}
	}
	rc = tapio_io__attach(io->skel);
	if (rc) {
		snprintf(err, err_len, "attach tracepoint/raw_syscalls/sys_exit: %s", strerror(-rc));
		goto fail;
	}
	return io;
fail:
	tapio_io__destroy(io->skel);
	free(io);
	return NULL;
}

/* Moves every entry of a retired generation into fn. Nothing writes to it,
 * so it is walked and emptied without races. *stopped when fn asked to stop
 * (entries may remain). */
static int tapio_io_drain(tapio_io_loader *io, uint32_t gen, tapio_aggregate_fn fn, void *ctx, bool *stopped)
{
	struct bpf_map *m = gen & 1 ? io->skel->maps.io_errors1 : io->skel->maps.io_errors0;
	int map = bpf_map__fd(m);
	struct tapio_io_key key, next, keys[256];
	struct tapio_io_value value;
	bool first;
	int delivered = 0;
	int n;

	*stopped = false;
	/* Collect a batch of keys, then move them out: deleting while walking
	 * would restart the walk. Repeat while batches come back full. */
	do {
		n = 0;
		first = true;
		while (n < (int)(sizeof(keys) / sizeof(keys[0]))) {
			if (bpf_map_get_next_key(map, first ? NULL : &key, &next))
				break;
			keys[n++] = next;
			key = next;
			first = false;
		}
		for (int i = 0; i < n; i++) {
			struct tapio_aggregate agg;

			/* Atomic on kernels >= 5.14; before that, look up then delete. */
			if (bpf_map_lookup_and_delete_elem(map, &keys[i], &value) &&
			    (bpf_map_lookup_elem(map, &keys[i], &value) || bpf_map_delete_elem(map, &keys[i])))
				continue;
			memset(&agg, 0, sizeof(agg));
			agg.kind = TAPIO_KIND_IO_ERROR;
			agg.cgroup_id = keys[i].cgroup_id;
			agg.pid = keys[i].pid;
			agg.uid = value.uid;
			agg.error = keys[i].error;
			agg.count = value.count;
			agg.first_ts_ns = value.first_ns;
			agg.interval_start_ns = io->harvested_ns;
			agg.interval_end_ns = io->harvest_ns;
			agg.syscall = tapio_io_syscall_name(keys[i].syscall_nr);
			memcpy(agg.comm, value.comm, TAPIO_COMM_LEN);
			delivered++;
			if (fn(ctx, &agg)) {
				*stopped = true;
				return delivered;
			}
		}
	} while (n == (int)(sizeof(keys) / sizeof(keys[0])));
	return delivered;
}

/* Double buffering: the program adds to the active generation of io_errors;
 * a harvest makes the other one active, waits until the program no longer
 * adds to the retired one, then empties it. No failure is added to an entry
 * after it was copied, so counts add up exactly. */
int tapio_io_harvest(tapio_io_loader *io, tapio_aggregate_fn fn, void *ctx)
{
	uint32_t retired;
	bool stopped;
	int delivered = 0;

	if (!io || !fn)
		return -EINVAL;
	/* The inactive generation must be empty before it becomes active
	 * again: finish what an earlier harvest left (timeout, or fn stopped). */
	if (io->retired_pending) {
		if (!tapio_wait_retired(&io->skel->bss->agg_busy[(io->gen ^ 1) & 1], TAPIO_IO_RETIRE_WAIT_NS))
			return -EBUSY;
		delivered = tapio_io_drain(io, io->gen ^ 1, fn, ctx, &stopped);
		if (stopped)
			return delivered;
		io->retired_pending = false;
		io->harvested_ns = io->harvest_ns;
	}
	/* What the generation retired now holds covers harvested_ns..now. */
	io->harvest_ns = tapio_io_now();
	retired = io->gen;
	io->gen ^= 1;
	__atomic_store_n(&io->skel->bss->agg_gen, io->gen, __ATOMIC_SEQ_CST);
	if (!tapio_wait_retired(&io->skel->bss->agg_busy[(retired) & 1], TAPIO_IO_RETIRE_WAIT_NS)) {
		io->retired_pending = true;
		return delivered;
	}
	delivered += tapio_io_drain(io, retired, fn, ctx, &stopped);
	io->retired_pending = stopped;
	if (!stopped)
		io->harvested_ns = io->harvest_ns;
	return delivered;
}

int tapio_io_read_drops(tapio_io_loader *io, uint64_t *out, size_t slots)
{
	size_t filled = TAPIO_KIND_MAX * TAPIO_DROP_REASON_MAX;

	if (!io || !out)
		return -EINVAL;
	memset(out, 0, slots * sizeof(*out));
	return tapio_sum_percpu(bpf_map__fd(io->skel->maps.drops), out, slots < filled ? slots : filled);
}

void tapio_io_close(tapio_io_loader *io)
{
	if (!io)
		return;
	tapio_io__destroy(io->skel);
	free(io);
}
