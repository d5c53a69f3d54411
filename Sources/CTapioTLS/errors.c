#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif

#include "errors.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include <openssl/err.h>

static void vappend(char *err, size_t err_len, size_t at, const char *fmt, va_list ap)
{
	if (err == NULL || err_len == 0 || at >= err_len - 1)
		return;
	/* vsnprintf truncates and always terminates. */
	(void)vsnprintf(err + at, err_len - at, fmt, ap);
}

void tt_err(char *err, size_t err_len, const char *fmt, ...)
{
	va_list ap;

	if (err == NULL || err_len == 0)
		return;
	err[0] = '\0';
	va_start(ap, fmt);
	vappend(err, err_len, 0, fmt, ap);
	va_end(ap);
}

void tt_err_append(char *err, size_t err_len, const char *fmt, ...)
{
	va_list ap;

	if (err == NULL || err_len == 0)
		return;
	va_start(ap, fmt);
	vappend(err, err_len, strnlen(err, err_len - 1), fmt, ap);
	va_end(ap);
}

void tt_err_append_openssl(char *err, size_t err_len)
{
	const char *data = NULL;
	int flags = 0;
	unsigned long e;
	int first = 1;

	while ((e = ERR_get_error_all(NULL, NULL, NULL, &data, &flags)) != 0) {
		const char *reason = ERR_reason_error_string(e);
		char code[256];

		if (ERR_SYSTEM_ERROR(e)) {
			reason = strerror(ERR_GET_REASON(e));
		} else if (reason == NULL) {
			ERR_error_string_n(e, code, sizeof code);
			reason = code;
		}
		tt_err_append(err, err_len, "%s%s", first ? ": " : "; ", reason);
		/* The data carries the useful detail, e.g. "calling fopen(/x, r)". */
		if (data != NULL && (flags & ERR_TXT_STRING) && data[0] != '\0')
			tt_err_append(err, err_len, " (%s)", data);
		first = 0;
	}
}
