// SPDX-License-Identifier: GPL-2.0
/* Process lifecycle: exec, exit of a whole process, OOM kill.
 *
 * Classic tracepoints only (no kprobes, fentry or tp_btf needed). Tracepoint
 * records are read through CO-RE-relocated trace_event_raw_* structs, so a
 * field that moved or is missing on the running kernel is handled at load
 * time, not by rebuilding.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_tracing.h>

#include "common.bpf.h"

char LICENSE[] SEC("license") = "GPL";

/* Offset of a __data_loc string from the start of the tracepoint record: the
 * low 16 bits of the location word (the high 16 bits are its length). */
#define TAPIO_DATA_LOC_OFFSET(loc) ((loc) & 0xFFFF)

SEC("tracepoint/sched/sched_process_exec")
int handle_exec(struct trace_event_raw_sched_process_exec *ctx)
{
	struct tapio_event *event;
	__u32 loc;

	if (!tapio_kind_enabled(TAPIO_KIND_PROCESS_EXEC) || !tapio_current_in_scope())
		return 0;
	event = tapio_reserve(TAPIO_KIND_PROCESS_EXEC);
	if (!event)
		return 0;
	/* Runs after the new image is in place: comm is already the new one. */
	tapio_fill_current(event);
	loc = ctx->__data_loc_filename;
	bpf_probe_read_kernel_str(event->u.exec.filename, sizeof(event->u.exec.filename),
				  (void *)ctx + TAPIO_DATA_LOC_OFFSET(loc));
	tapio_submit(event);
	return 0;
}

SEC("tracepoint/sched/sched_process_exit")
int handle_exit(struct trace_event_raw_sched_process_exit *ctx)
{
	struct task_struct *task;
	struct tapio_event *event;
	__u64 pid_tgid;
	int code;

	if (!tapio_kind_enabled(TAPIO_KIND_PROCESS_EXIT))
		return 0;
	/* One event per process: only when its thread-group leader exits. */
	pid_tgid = bpf_get_current_pid_tgid();
	if ((__u32)pid_tgid != (__u32)(pid_tgid >> 32))
		return 0;
	if (!tapio_current_in_scope())
		return 0;
	event = tapio_reserve(TAPIO_KIND_PROCESS_EXIT);
	if (!event)
		return 0;
	tapio_fill_current(event);
	/* do_exit() stores the wait(2) status before this tracepoint fires:
	 * exit status in bits 8..15, terminating signal in 0..6, core dump 7. */
	task = (struct task_struct *)bpf_get_current_task();
	code = BPF_CORE_READ(task, exit_code);
	event->u.exit.exit_code = (code >> 8) & 0xff;
	event->u.exit.signal = code & 0x7f;
	event->u.exit.core_dumped = (code & 0x80) != 0;
	tapio_submit(event);
	return 0;
}

/* The OOM killer chose a victim. The record is about the victim, so the
 * header's pid is the victim's (it matches the process_exit that follows),
 * but the current task is whoever ran the OOM killer: for a memcg OOM the
 * task whose charge failed, which is in the same memcg as the victim; for a
 * global OOM any allocating task; for sysrq-f a kworker. The filter and
 * cgroup_id therefore describe the current task, not the victim.
 *
 * Old kernels record only the victim pid; comm, uid and the memory sizes
 * (already in kB) are read only where the running kernel has them. */
SEC("tracepoint/oom/mark_victim")
int handle_oom(struct trace_event_raw_mark_victim *ctx)
{
	struct tapio_event *event;
	__u32 victim;
	__u32 loc;

	if (!tapio_kind_enabled(TAPIO_KIND_OOM_KILL) || !tapio_current_in_scope())
		return 0;
	event = tapio_reserve(TAPIO_KIND_OOM_KILL);
	if (!event)
		return 0;
	tapio_fill_current(event);
	victim = ctx->pid;
	event->u.oom.victim_pid = victim;
	if (victim != event->tid) {
		/* Someone else's allocation chose this victim: nothing from the
		 * current task describes it. ppid stays 0 (unknown). */
		event->pid = victim;
		event->tid = victim;
		event->ppid = 0;
		event->uid = 0;
		__builtin_memset(event->comm, 0, sizeof(event->comm));
	}
	/* Otherwise the victim is the current thread (common in a memcg OOM,
	 * where the biggest task is often the one allocating) and the header
	 * from the current task already describes it. */
	event->u.oom.victim_uid = event->uid;
	__builtin_memcpy(event->u.oom.victim_comm, event->comm, sizeof(event->comm));
	if (bpf_core_field_exists(ctx->uid)) {
		event->u.oom.victim_uid = ctx->uid;
		event->uid = ctx->uid;
	}
	if (bpf_core_field_exists(ctx->__data_loc_comm)) {
		loc = ctx->__data_loc_comm;
		bpf_probe_read_kernel_str(event->u.oom.victim_comm, sizeof(event->u.oom.victim_comm),
					  (void *)ctx + TAPIO_DATA_LOC_OFFSET(loc));
		__builtin_memcpy(event->comm, event->u.oom.victim_comm, sizeof(event->comm));
	}
	if (bpf_core_field_exists(ctx->total_vm))
		event->u.oom.total_vm_kb = ctx->total_vm;
	if (bpf_core_field_exists(ctx->anon_rss))
		event->u.oom.anon_rss_kb = ctx->anon_rss;
	if (bpf_core_field_exists(ctx->file_rss))
		event->u.oom.file_rss_kb = ctx->file_rss;
	tapio_submit(event);
	return 0;
}

/* Benchmark only (`make bench`, bench/): a per-event storm the kernel cannot
 * fold. Every getppid() of a task whose comm is bench_comm emits one
 * process_exit record (exit code 0) through the same reserve, fill and submit
 * path as the programs above, so the agent's whole pipeline is measured at a
 * rate the benchmark controls. Not loaded unless the loader sets bench_comm. */
const volatile char bench_comm[TAPIO_COMM_LEN] = {};

SEC("tracepoint/syscalls/sys_enter_getppid")
int tapio_bench_storm(void *ctx)
{
	char comm[TAPIO_COMM_LEN];
	struct tapio_event *event;
	int i;

	bpf_get_current_comm(comm, sizeof(comm));
	for (i = 0; i < TAPIO_COMM_LEN; i++) {
		if (comm[i] != bench_comm[i])
			return 0;
		if (comm[i] == 0)
			break;
	}
	if (!tapio_kind_enabled(TAPIO_KIND_PROCESS_EXIT) || !tapio_current_in_scope())
		return 0;
	event = tapio_reserve(TAPIO_KIND_PROCESS_EXIT);
	if (!event)
		return 0;
	tapio_fill_current(event);
	tapio_submit(event);
	return 0;
}
