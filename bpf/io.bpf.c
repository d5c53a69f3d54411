// SPDX-License-Identifier: GPL-2.0
/* I/O errors: failed writes, syncs and opens with errno such as ENOSPC, EIO,
 * EDQUOT, aggregated in the kernel.
 *
 * One classic tracepoint, raw_syscalls/sys_exit, sees every syscall return.
 * The return value is tested first (one compare per syscall on the hot path);
 * only the few error codes that mean "the storage failed" go on to a hash map
 * that folds them per (cgroup, process, syscall, errno). The agent harvests the
 * map every interval, so a process failing 100k writes a second costs one
 * event per interval, not 100k.
 *
 * The map is double buffered (io_errors0/io_errors1, agg_gen says which one
 * the program adds to) so the harvest empties a generation nothing writes any
 * more: an increment can never land in an entry user space already copied.
 * The protocol is in bpf/generations.bpf.h (shared with bpf/net.bpf.c).
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_tracing.h>

#include "common.bpf.h"
#include "generations.bpf.h"
#include "tapio_io.h"

char LICENSE[] SEC("license") = "GPL";

/* errno values as the kernel returns them (negated). */
#define TAPIO_EIO 5
#define TAPIO_EFBIG 27
#define TAPIO_ENOSPC 28
#define TAPIO_EROFS 30
#define TAPIO_EDQUOT 122
#define TAPIO_EEXIST 17

/* One per generation; TAPIO_IO_MAX_KEYS is per generation. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, TAPIO_IO_MAX_KEYS);
	__type(key, struct tapio_io_key);
	__type(value, struct tapio_io_value);
} io_errors0 SEC(".maps"), io_errors1 SEC(".maps");


/* Syscall numbers (of this architecture) whose failures are reported; the
 * loader fills it so the program itself holds no per-architecture table. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 64);
	__type(key, __u32);
	__type(value, __u8);
} io_syscalls SEC(".maps");

static __always_inline bool tapio_storage_errno(long ret)
{
	return ret == -TAPIO_ENOSPC || ret == -TAPIO_EIO || ret == -TAPIO_EDQUOT ||
	       ret == -TAPIO_EFBIG || ret == -TAPIO_EROFS;
}

SEC("tracepoint/raw_syscalls/sys_exit")
int handle_sys_exit(struct trace_event_raw_sys_exit *ctx)
{
	struct tapio_io_value *value, init = {};
	struct tapio_io_key key = {};
	long ret = ctx->ret;
	__u64 *busy;
	__u32 nr, gen;
	void *map;
	long err;

	if (!tapio_storage_errno(ret))
		return 0;
	if (!tapio_kind_enabled(TAPIO_KIND_IO_ERROR) || !tapio_current_in_scope())
		return 0;
	nr = (__u32)ctx->id;
	if (!bpf_map_lookup_elem(&io_syscalls, &nr))
		return 0;

	key.cgroup_id = bpf_get_current_cgroup_id();
	key.pid = bpf_get_current_pid_tgid() >> 32;
	key.syscall_nr = nr;
	key.error = (__s32)-ret;

	busy = tapio_gen_enter(&gen, TAPIO_KIND_IO_ERROR);
	if (!busy)
		return 0;
	map = gen ? (void *)&io_errors1 : (void *)&io_errors0;
	value = bpf_map_lookup_elem(map, &key);
	if (!value) {
		init.count = 1;
		init.first_ns = bpf_ktime_get_ns();
		init.last_ns = init.first_ns;
		init.uid = (__u32)bpf_get_current_uid_gid();
		bpf_get_current_comm(init.comm, sizeof(init.comm));
		err = bpf_map_update_elem(map, &key, &init, BPF_NOEXIST);
		if (err == -TAPIO_EEXIST) /* another CPU inserted it first */
			value = bpf_map_lookup_elem(map, &key);
		else if (err) /* a full map loses the new key: counted, never silent */
			tapio_count_drop(TAPIO_KIND_IO_ERROR, TAPIO_DROP_MAP_FULL);
	}
	if (value) {
		__sync_fetch_and_add(&value->count, 1);
		value->last_ns = bpf_ktime_get_ns();
	}
	tapio_gen_exit(busy);
	return 0;
}
