/* Error-message helpers shared by the C files of this target (not public). */
#ifndef TAPIO_TLS_ERRORS_H
#define TAPIO_TLS_ERRORS_H

#include <stddef.h>

#if defined(__GNUC__) || defined(__clang__)
#define TT_PRINTF(fmt, args) __attribute__((format(printf, fmt, args)))
#else
#define TT_PRINTF(fmt, args)
#endif

/// Formats a message into err (if err and err_len allow), replacing what was there.
void tt_err(char *err, size_t err_len, const char *fmt, ...) TT_PRINTF(3, 4);

/// Appends to the message in err, truncating at err_len.
void tt_err_append(char *err, size_t err_len, const char *fmt, ...) TT_PRINTF(3, 4);

/// Appends ": reason; reason..." for the OpenSSL errors queued on this thread,
/// oldest (usually the root cause) first, and empties the queue. Appends
/// nothing if the queue is empty.
void tt_err_append_openssl(char *err, size_t err_len);

#endif
