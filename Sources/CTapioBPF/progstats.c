#include "tapio_progstats.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <bpf/bpf.h>

int tapio_prog_stats_self(struct tapio_prog_stats *out, int max)
{
	DIR *dir = opendir("/proc/self/fd");
	struct dirent *entry;
	int found = 0;

	if (!dir)
		return -errno;
	while ((entry = readdir(dir))) {
		char path[64], target[64];
		struct bpf_prog_info info;
		__u32 len = sizeof(info);
		ssize_t n;
		int fd, known = 0;

		if (entry->d_name[0] == '.')
			continue;
		fd = atoi(entry->d_name);
		if (fd == dirfd(dir))
			continue;
		snprintf(path, sizeof(path), "/proc/self/fd/%s", entry->d_name);
		n = readlink(path, target, sizeof(target) - 1);
		if (n <= 0)
			continue;
		target[n] = 0;
		if (strcmp(target, "anon_inode:bpf-prog") != 0)
			continue;
		memset(&info, 0, sizeof(info));
		if (bpf_obj_get_info_by_fd(fd, &info, &len) != 0)
			continue;
		for (int i = 0; i < found && i < max; i++)
			if (out[i].id == info.id)
				known = 1;
		if (known)
			continue;
		if (found < max) {
			struct tapio_prog_stats *s = &out[found];
			memset(s, 0, sizeof(*s));
			s->id = info.id;
			memcpy(s->name, info.name, sizeof(s->name) - 1);
			s->run_count = info.run_cnt;
			s->run_time_ns = info.run_time_ns;
			s->recursion_misses = info.recursion_misses;
		}
		found++;
	}
	closedir(dir);
	return found;
}

int tapio_prog_stats_enable(void)
{
	int fd = bpf_enable_stats(BPF_STATS_RUN_TIME);

	return fd < 0 ? (errno ? -errno : fd) : fd;
}

int tapio_prog_stats_enabled(void)
{
	char text[8] = {0};
	int fd = open("/proc/sys/kernel/bpf_stats_enabled", O_RDONLY | O_CLOEXEC);
	ssize_t n;

	if (fd < 0)
		return -errno;
	n = read(fd, text, sizeof(text) - 1);
	close(fd);
	if (n <= 0)
		return -EIO;
	return text[0] == '1';
}
