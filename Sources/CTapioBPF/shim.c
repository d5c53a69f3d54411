#define _GNU_SOURCE
#include "tapio_bpf.h"
#include "percpu.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/magic.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <time.h>
#include <unistd.h>

#include <bpf/bpf.h>
#include <bpf/libbpf.h>

#include "process.skel.h"

#define TAPIO_BPF_DEFAULT_RINGBUF_BYTES (4u << 20)
/* Keeps the end of a long verifier log, which is where the reason is. */
#define TAPIO_BPF_LOG_MAX (64u * 1024u)
#define TAPIO_BPF_MAX_PROGRAMS 32
#define TAPIO_BPF_DROP_SLOTS (TAPIO_KIND_MAX * TAPIO_DROP_REASON_MAX)

/* What each BPF program provides. The kind lets a disabled kind skip loading
 * its program altogether. */
static const struct {
	const char *program;
	const char *capability;
	uint32_t kind;
} tapio_capabilities[] = {
	{ "handle_exec", "process_exec", TAPIO_KIND_PROCESS_EXEC },
	{ "handle_exit", "process_exit", TAPIO_KIND_PROCESS_EXIT },
	{ "handle_oom", "oom_kill", TAPIO_KIND_OOM_KILL },
	{ "tapio_bench_storm", "bench_storm", TAPIO_KIND_PROCESS_EXIT },
};

struct tapio_log {
	char *text; /* NUL-terminated, or NULL when empty */
	size_t len;
};

struct tapio_bpf_program {
	struct bpf_program *prog;
	const char *capability;
	struct bpf_link *link;
	char error[160];
};

struct tapio_bpf {
	struct tapio_process *process;
	uint32_t ringbuf_bytes;
	int program_count;
	struct tapio_bpf_program programs[TAPIO_BPF_MAX_PROGRAMS];
	struct tapio_log log;
};

/* Where libbpf's messages go while tapio_bpf_open() runs on this thread. */
static _Thread_local struct tapio_log *tapio_log_capture;

static void tapio_log_append(struct tapio_log *log, const char *text, size_t len)
{
	char *grown = realloc(log->text, log->len + len + 1);

	if (!grown)
		return;
	memcpy(grown + log->len, text, len);
	log->len += len;
	grown[log->len] = '\0';
	log->text = grown;
	if (log->len > TAPIO_BPF_LOG_MAX) {
		size_t cut = log->len - TAPIO_BPF_LOG_MAX;

		memmove(log->text, log->text + cut, TAPIO_BPF_LOG_MAX + 1);
		log->len = TAPIO_BPF_LOG_MAX;
	}
}

static int tapio_libbpf_print(enum libbpf_print_level level, const char *fmt, va_list args)
{
	va_list copy;
	char *text;
	int len;

	if (level == LIBBPF_DEBUG)
		return 0;
	if (!tapio_log_capture)
		return vfprintf(stderr, fmt, args);
	va_copy(copy, args);
	len = vsnprintf(NULL, 0, fmt, copy);
	va_end(copy);
	if (len <= 0)
		return len;
	text = malloc((size_t)len + 1);
	if (!text)
		return -ENOMEM;
	vsnprintf(text, (size_t)len + 1, fmt, args);
	tapio_log_append(tapio_log_capture, text, (size_t)len);
	free(text);
	return len;
}

static pthread_once_t tapio_print_once = PTHREAD_ONCE_INIT;

static void tapio_install_print(void)
{
	libbpf_set_print(tapio_libbpf_print);
}

/* "what: strerror", then as much of the end of the libbpf log as fits. */
static void tapio_set_error(char *err, size_t err_len, const struct tapio_log *log,
			    const char *what, int rc)
{
	size_t used, room;
	const char *tail, *line;

	if (!err || err_len == 0)
		return;
	snprintf(err, err_len, "%s: %s", what, strerror(rc < 0 ? -rc : rc));
	if (!log->text)
		return;
	used = strlen(err);
	if (used + 2 >= err_len)
		return;
	room = err_len - used - 2;
	tail = log->text;
	if (log->len > room) {
		tail = log->text + log->len - room;
		/* Start on a line boundary when one is near. */
		line = strchr(tail, '\n');
		if (line && line[1] != '\0')
			tail = line + 1;
	}
	snprintf(err + used, err_len - used, "\n%s", tail);
}

static bool tapio_valid_ringbuf_bytes(uint32_t bytes)
{
	long page = sysconf(_SC_PAGESIZE);

	return bytes != 0 && (bytes & (bytes - 1)) == 0 && page > 0 && bytes % (uint32_t)page == 0;
}

/* Registers the object's programs and switches off those whose kind the
 * config disables. Must run between open and load. */
static int tapio_add_programs(tapio_bpf *bpf, struct bpf_object *obj, uint32_t kinds_disabled_mask, bool bench)
{
	struct bpf_program *prog;

	bpf_object__for_each_program(prog, obj) {
		struct tapio_bpf_program *entry;
		const char *name = bpf_program__name(prog);
		size_t i;

		/* The benchmark's storm program exists only when asked for:
		 * otherwise neither loaded nor listed (it is no capability). */
		if (strcmp(name, "tapio_bench_storm") == 0 && !bench) {
			bpf_program__set_autoload(prog, false);
			continue;
		}
		if (bpf->program_count == TAPIO_BPF_MAX_PROGRAMS)
			return -E2BIG;
		entry = &bpf->programs[bpf->program_count++];
		entry->prog = prog;
		entry->capability = name;
		for (i = 0; i < sizeof(tapio_capabilities) / sizeof(tapio_capabilities[0]); i++) {
			if (strcmp(tapio_capabilities[i].program, name) != 0)
				continue;
			entry->capability = tapio_capabilities[i].capability;
			if (kinds_disabled_mask & (1u << tapio_capabilities[i].kind)) {
				bpf_program__set_autoload(prog, false);
				snprintf(entry->error, sizeof(entry->error), "disabled by configuration");
			}
		}
	}
	return 0;
}

/* Attaches every loaded program on its own, so one missing hook degrades only
 * its capability. Returns how many attached. */
static int tapio_attach_programs(tapio_bpf *bpf)
{
	int attached = 0;
	int i;

	for (i = 0; i < bpf->program_count; i++) {
		struct tapio_bpf_program *entry = &bpf->programs[i];

		if (!bpf_program__autoload(entry->prog))
			continue;
		entry->link = bpf_program__attach(entry->prog);
		if (!entry->link) {
			int rc = errno;

			snprintf(entry->error, sizeof(entry->error), "attach %s: %s",
				 bpf_program__section_name(entry->prog), strerror(rc));
			continue;
		}
		attached++;
	}
	return attached;
}

tapio_bpf *tapio_bpf_open(const tapio_bpf_config *config, char *err, size_t err_len)
{
	static const tapio_bpf_config defaults;
	const tapio_bpf_config *cfg = config ? config : &defaults;
	uint32_t ringbuf_bytes = cfg->ringbuf_bytes ? cfg->ringbuf_bytes : TAPIO_BPF_DEFAULT_RINGBUF_BYTES;
	struct tapio_process *skel;
	tapio_bpf *bpf;
	int rc, i;

	if (err && err_len)
		err[0] = '\0';
	if (!tapio_valid_ringbuf_bytes(ringbuf_bytes)) {
		if (err && err_len)
			snprintf(err, err_len, "ring buffer size %u: not a power of two multiple of the page size",
				 ringbuf_bytes);
		return NULL;
	}
	bpf = calloc(1, sizeof(*bpf));
	if (!bpf) {
		if (err && err_len)
			snprintf(err, err_len, "%s", strerror(ENOMEM));
		return NULL;
	}
	pthread_once(&tapio_print_once, tapio_install_print);
	tapio_log_capture = &bpf->log;

	skel = tapio_process__open();
	if (!skel) {
		rc = -errno;
		tapio_set_error(err, err_len, &bpf->log, "open BPF object", rc);
		goto fail;
	}
	bpf->process = skel;
	skel->rodata->cgroup_root_id = cfg->cgroup_root_id;
	skel->rodata->cgroup_root_level = cfg->cgroup_root_level;
	skel->rodata->kinds_disabled_mask = cfg->kinds_disabled_mask;
	skel->rodata->wakeup_bytes = tapio_wakeup_mark(cfg->wakeup_bytes, ringbuf_bytes);
	if (cfg->bench_comm && cfg->bench_comm[0])
		strncpy((char *)skel->rodata->bench_comm, cfg->bench_comm, sizeof(skel->rodata->bench_comm) - 1);
	bpf->ringbuf_bytes = ringbuf_bytes;
	rc = bpf_map__set_max_entries(skel->maps.events, ringbuf_bytes);
	if (rc) {
		tapio_set_error(err, err_len, &bpf->log, "size ring buffer", rc);
		goto fail;
	}
	rc = tapio_add_programs(bpf, skel->obj, cfg->kinds_disabled_mask, cfg->bench_comm && cfg->bench_comm[0]);
	if (rc) {
		tapio_set_error(err, err_len, &bpf->log, "list programs", rc);
		goto fail;
	}

	rc = tapio_process__load(skel);
	if (rc) {
		tapio_set_error(err, err_len, &bpf->log, "load BPF programs", rc);
		goto fail;
	}
	if (tapio_attach_programs(bpf) == 0) {
		const char *why = "every kind is disabled";

		for (i = 0; i < bpf->program_count; i++) {
			if (bpf_program__autoload(bpf->programs[i].prog)) {
				why = bpf->programs[i].error;
				break;
			}
		}
		if (err && err_len)
			snprintf(err, err_len, "no BPF program attached (%s)", why);
		goto fail;
	}

	/* The ring is read through a tapio_rings (tapio_bpf_events_fd()). */
	tapio_log_capture = NULL;
	return bpf;

fail:
	tapio_log_capture = NULL;
	tapio_bpf_close(bpf);
	return NULL;
}

int tapio_bpf_program_count(const tapio_bpf *bpf)
{
	return bpf ? bpf->program_count : 0;
}

static const struct tapio_bpf_program *tapio_program_at(const tapio_bpf *bpf, int index)
{
	if (!bpf || index < 0 || index >= bpf->program_count)
		return NULL;
	return &bpf->programs[index];
}

const char *tapio_bpf_program_name(const tapio_bpf *bpf, int index)
{
	const struct tapio_bpf_program *entry = tapio_program_at(bpf, index);

	return entry ? bpf_program__name(entry->prog) : NULL;
}

const char *tapio_bpf_program_capability(const tapio_bpf *bpf, int index)
{
	const struct tapio_bpf_program *entry = tapio_program_at(bpf, index);

	return entry ? entry->capability : NULL;
}

int tapio_bpf_program_attached(const tapio_bpf *bpf, int index)
{
	const struct tapio_bpf_program *entry = tapio_program_at(bpf, index);

	return entry && entry->link ? 1 : 0;
}

const char *tapio_bpf_program_error(const tapio_bpf *bpf, int index)
{
	const struct tapio_bpf_program *entry = tapio_program_at(bpf, index);

	return entry ? entry->error : NULL;
}

const char *tapio_bpf_log(const tapio_bpf *bpf)
{
	return bpf && bpf->log.text ? bpf->log.text : "";
}

int tapio_bpf_events_fd(const tapio_bpf *bpf)
{
	return bpf ? bpf_map__fd(bpf->process->maps.events) : -EINVAL;
}

uint32_t tapio_bpf_ringbuf_bytes(const tapio_bpf *bpf)
{
	return bpf ? bpf->ringbuf_bytes : 0;
}

uint64_t tapio_wakeup_mark(uint32_t configured, uint32_t ring_bytes)
{
	if (configured == UINT32_MAX)
		return 0;
	if (configured == 0)
		return ring_bytes / 16;
	return configured < ring_bytes ? configured : ring_bytes / 2;
}

int tapio_bpf_read_drops(tapio_bpf *bpf, uint64_t *out, size_t slots)
{
	if (!bpf || !out)
		return -EINVAL;
	memset(out, 0, slots * sizeof(*out));
	return tapio_sum_percpu(bpf_map__fd(bpf->process->maps.drops), out,
				slots < TAPIO_BPF_DROP_SLOTS ? slots : TAPIO_BPF_DROP_SLOTS);
}

void tapio_bpf_close(tapio_bpf *bpf)
{
	int i;

	if (!bpf)
		return;
	for (i = 0; i < bpf->program_count; i++)
		bpf_link__destroy(bpf->programs[i].link);
	tapio_process__destroy(bpf->process);
	free(bpf->log.text);
	free(bpf);
}

/* libbpf 1.1 reads tracepoint ids under /sys/kernel/debug/tracing when that
 * path exists (debugfs mounts tracefs there on access), else under
 * /sys/kernel/tracing; it decides once per process. */
int tapio_bpf_ensure_tracefs(void)
{
	const char *dir = access("/sys/kernel/debug/tracing", F_OK) == 0 ? "/sys/kernel/debug/tracing"
									 : "/sys/kernel/tracing";
	char events[64];
	int rc;

	snprintf(events, sizeof(events), "%s/events", dir);
	if (access(events, F_OK) == 0)
		return 0;
	/* Present but not reachable (EACCES, ...): mounting would not help. */
	if (errno != ENOENT)
		return -errno;
	if (mount("tracefs", dir, "tracefs", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL) == 0)
		return 0;
	rc = errno;
	if (rc == EBUSY && access(events, F_OK) == 0)
		return 0;
	return -rc;
}

/* Decodes mountinfo's octal escapes (\040 for a space, ...) in place. */
static void tapio_unescape(char *s)
{
	char *out = s;

	while (*s) {
		if (s[0] == '\\' && s[1] >= '0' && s[1] <= '3' && s[2] >= '0' && s[2] <= '7' &&
		    s[3] >= '0' && s[3] <= '7') {
			*out++ = (char)((s[1] - '0') * 64 + (s[2] - '0') * 8 + (s[3] - '0'));
			s += 4;
		} else {
			*out++ = *s++;
		}
	}
	*out = '\0';
}

static uint32_t tapio_path_components(const char *path)
{
	uint32_t count = 0;

	while (*path) {
		while (*path == '/')
			path++;
		if (!*path)
			break;
		count++;
		while (*path && *path != '/')
			path++;
	}
	return count;
}

/* Length of mount point `mnt` when it contains `path`, else -1. */
static long tapio_mount_prefix(const char *mnt, const char *path)
{
	size_t len = strlen(mnt);

	if (strcmp(mnt, "/") == 0)
		return 0;
	if (strncmp(path, mnt, len) != 0 || (path[len] != '\0' && path[len] != '/'))
		return -1;
	return (long)len;
}

/* Depth of `path` (absolute, symlink-free) in the cgroup2 hierarchy: the
 * components of the containing mount's root within the hierarchy plus those
 * of the path below the mount point. */
static int tapio_cgroup2_level(const char *path, uint32_t *level)
{
	FILE *mountinfo = fopen("/proc/self/mountinfo", "re");
	char *line = NULL;
	size_t cap = 0;
	long best = -1;
	uint32_t best_level = 0;

	if (!mountinfo)
		return -errno;
	while (getline(&line, &cap, mountinfo) > 0) {
		char *fields[5], *sep, *fstype, *save = NULL;
		long prefix;
		int n;

		/* id parent major:minor root mount-point options [optional...] - fstype ... */
		sep = strstr(line, " - ");
		if (!sep)
			continue;
		*sep = '\0';
		fstype = strtok_r(sep + 3, " ", &save);
		if (!fstype || strcmp(fstype, "cgroup2") != 0)
			continue;
		save = NULL;
		for (n = 0; n < 5; n++) {
			fields[n] = strtok_r(n == 0 ? line : NULL, " ", &save);
			if (!fields[n])
				break;
		}
		if (n < 5)
			continue;
		tapio_unescape(fields[3]);
		tapio_unescape(fields[4]);
		prefix = tapio_mount_prefix(fields[4], path);
		/* Longest mount point wins; of equal ones the later, which is on top. */
		if (prefix < 0 || prefix < best)
			continue;
		best = prefix;
		best_level = tapio_path_components(fields[3]) + tapio_path_components(path + prefix);
	}
	free(line);
	fclose(mountinfo);
	if (best < 0)
		return -ENOENT;
	*level = best_level;
	return 0;
}

int tapio_bpf_cgroup_id(const char *cgroup2_dir, uint64_t *id, uint32_t *level)
{
	union {
		struct file_handle handle;
		char bytes[sizeof(struct file_handle) + sizeof(uint64_t)];
	} fh;
	char path[PATH_MAX];
	struct statfs fs;
	struct stat st;
	int mount_id;

	if (!cgroup2_dir || !id || !level)
		return -EINVAL;
	if (!realpath(cgroup2_dir, path))
		return -errno;
	if (statfs(path, &fs) != 0 || stat(path, &st) != 0)
		return -errno;
	if (fs.f_type != CGROUP2_SUPER_MAGIC)
		return -EINVAL;
	if (!S_ISDIR(st.st_mode))
		return -ENOTDIR;
	/* The file handle of a kernfs node carries its full 64-bit id, which is
	 * what bpf_get_current_cgroup_id() returns; st_ino is the same value
	 * where ino_t has 64 bits, the fallback. */
	fh.handle.handle_bytes = sizeof(uint64_t);
	if (name_to_handle_at(AT_FDCWD, path, &fh.handle, &mount_id, 0) == 0 &&
	    fh.handle.handle_bytes == sizeof(uint64_t))
		memcpy(id, fh.handle.f_handle, sizeof(uint64_t));
	else
		*id = (uint64_t)st.st_ino;
	return tapio_cgroup2_level(path, level);
}

static int64_t tapio_clock_ns(clockid_t clock)
{
	struct timespec ts;

	clock_gettime(clock, &ts);
	return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

void tapio_bpf_clock_pair(int64_t *monotonic_ns, int64_t *realtime_ns)
{
	int64_t best_gap = INT64_MAX;
	int i;

	for (i = 0; i < 3; i++) {
		int64_t before = tapio_clock_ns(CLOCK_MONOTONIC);
		int64_t real = tapio_clock_ns(CLOCK_REALTIME);
		int64_t after = tapio_clock_ns(CLOCK_MONOTONIC);

		if (after - before < best_gap) {
			best_gap = after - before;
			if (monotonic_ns)
				*monotonic_ns = before + best_gap / 2;
			if (realtime_ns)
				*realtime_ns = real;
		}
	}
}
