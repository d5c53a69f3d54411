/* Shared by every bpf/<name>.bpf.c: the settings, the ring buffer, the drop
 * counters and the filter. Include after vmlinux.h and the libbpf headers.
 *
 * Each object that includes this file gets its own `events` and `drops` maps;
 * the loader may point them at one shared ring buffer and counter array with
 * bpf_map__reuse_fd() so the agent polls a single buffer.
 */
#ifndef TAPIO_COMMON_BPF_H
#define TAPIO_COMMON_BPF_H

#define __TAPIO_BPF__
#include "tapio_events.h"

/* Settings, written by the loader between open and load; the verifier sees
 * them as constants and prunes the branches they switch off. */

/* cgroup v2 id of the subtree to watch; 0 watches every cgroup. */
const volatile __u64 cgroup_root_id = 0;
/* Depth of cgroup_root_id below the cgroup2 root (the root is level 0). */
const volatile __u32 cgroup_root_level = 0;
/* Bit (1u << kind) set: events of that kind are never emitted. */
const volatile __u32 kinds_disabled_mask = 0;
/* Adaptive wakeup: while fewer than wakeup_bytes wait in the ring, records
 * are submitted without waking the reader (it drains them on its own timer,
 * docs/architecture.md); at or above the mark every TAPIO_WAKEUP_EVERY-th
 * record of a CPU wakes it. 0 keeps the kernel's default (a wakeup whenever
 * the reader has caught up), which at high rates costs one reader wakeup
 * per record. */
const volatile __u64 wakeup_bytes = 0;

/* Past the mark, one record in this many (per CPU) forces a wakeup. A
 * forced wakeup queues irq_work (a self-IPI, on a VM an exit) whenever none
 * is pending: forcing it on every record made each system call of a busy
 * process several microseconds slower while the reader was behind. */
#define TAPIO_WAKEUP_EVERY 64

/* 1 MiB in the object; the loaders size it (4 MiB for process and dns by
 * default, --ring-buffer): a power of two, a multiple of the page size. */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 20);
} events SEC(".maps");

/* Records submitted past the wakeup mark, per CPU (one slot). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} past_mark SEC(".maps");

/* Events lost in the kernel, at kind * TAPIO_DROP_REASON_MAX + reason. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, TAPIO_KIND_MAX * TAPIO_DROP_REASON_MAX);
	__type(key, __u32);
	__type(value, __u64);
} drops SEC(".maps");

static __always_inline bool tapio_kind_enabled(__u32 kind)
{
	return (kinds_disabled_mask & (1u << kind)) == 0;
}

/* True when the current task is inside the watched cgroup v2 subtree. The
 * helper returns 0 when the task sits above cgroup_root_level, so tasks
 * outside the subtree never match. */
static __always_inline bool tapio_current_in_scope(void)
{
	if (cgroup_root_id == 0)
		return true;
	return bpf_get_current_ancestor_cgroup_id(cgroup_root_level) == cgroup_root_id;
}

static __always_inline void tapio_count_drop(__u32 kind, __u32 reason)
{
	__u32 key = kind * TAPIO_DROP_REASON_MAX + reason;
	__u64 *count = bpf_map_lookup_elem(&drops, &key);

	/* Per-CPU, but BPF programs only disable migration, not preemption:
	 * another program on this CPU may interleave, so add atomically. */
	if (count)
		__sync_fetch_and_add(count, 1);
}

/* Reserves a zeroed record (no stale bytes from earlier records reach user
 * space) or counts the loss. */
static __always_inline struct tapio_event *tapio_reserve(__u32 kind)
{
	struct tapio_event *event = bpf_ringbuf_reserve(&events, sizeof(*event), 0);

	if (!event) {
		tapio_count_drop(kind, TAPIO_DROP_RINGBUF_FULL);
		return NULL;
	}
	__builtin_memset(event, 0, sizeof(*event));
	event->kind = kind;
	event->ts_ns = bpf_ktime_get_ns();
	return event;
}

/* Submits a reserved record, waking the reader only past the fill mark,
 * and there with one record in TAPIO_WAKEUP_EVERY of each CPU: the reader,
 * once woken, drains the ring whole, and its read interval bounds the wait
 * of whatever no wakeup announced. */
static __always_inline void tapio_submit(void *event)
{
	__u64 flags = 0;

	if (wakeup_bytes) {
		flags = BPF_RB_NO_WAKEUP;
		if (bpf_ringbuf_query(&events, BPF_RB_AVAIL_DATA) >= wakeup_bytes) {
			__u32 key = 0;
			__u64 *n = bpf_map_lookup_elem(&past_mark, &key);

			if (!n || (*n)++ % TAPIO_WAKEUP_EVERY == 0)
				flags = BPF_RB_FORCE_WAKEUP;
		}
	}
	bpf_ringbuf_submit(event, flags);
}

/* The kernfs id of a task's memory-controller cgroup: on a v1 or hybrid
 * host the directory in the memory hierarchy (whose inode number it is), on
 * a v2 host the nearest cgroup with the memory controller enabled. 0 when
 * the kernel has no memory controller. Read through CO-RE, so the subsystem
 * index and the struct layouts are the running kernel's. */
static __always_inline __u64 tapio_memory_cgroup_id(struct task_struct *task)
{
	struct cgroup_subsys_state *css = NULL;
	struct css_set *set;
	int index;

	if (!bpf_core_enum_value_exists(enum cgroup_subsys_id, memory_cgrp_id))
		return 0;
	index = bpf_core_enum_value(enum cgroup_subsys_id, memory_cgrp_id);
	set = BPF_CORE_READ(task, cgroups);
	if (!set || index < 0 || index >= 32)
		return 0;
	bpf_core_read(&css, sizeof(css), &set->subsys[index]);
	if (!css)
		return 0;
	return BPF_CORE_READ(css, cgroup, kn, id);
}

/* Fills pid, tid, ppid, uid, comm, cgroup_id and mem_cgroup_id from the current task. */
static __always_inline void tapio_fill_current(struct tapio_event *event)
{
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	__u64 pid_tgid = bpf_get_current_pid_tgid();

	event->pid = pid_tgid >> 32;
	event->tid = (__u32)pid_tgid;
	event->ppid = BPF_CORE_READ(task, real_parent, tgid);
	event->uid = (__u32)bpf_get_current_uid_gid();
	event->cgroup_id = bpf_get_current_cgroup_id();
	event->mem_cgroup_id = tapio_memory_cgroup_id(task);
	bpf_get_current_comm(event->comm, sizeof(event->comm));
}

#endif
