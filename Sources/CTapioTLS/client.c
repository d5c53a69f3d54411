/* The agent's side of the wire: a TLS 1.3 client with mutual authentication on
 * a non-blocking socket, every wait bounded by poll(). */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif

#include "tapio_tls.h"
#include "errors.h"

#include <arpa/inet.h>
#include <errno.h>
#include <limits.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <openssl/bio.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

enum tt_state {
	TT_OPEN,
	TT_PEER_CLOSED, /* close_notify received: we may still answer with ours */
	TT_PEER_EOF,    /* TCP EOF without close_notify: OpenSSL forbids SSL_shutdown */
	TT_FAILED,      /* fatal error: OpenSSL forbids SSL_shutdown */
};

struct tapio_tls {
	int fd;
	SSL_CTX *ctx;
	SSL *ssl;
	enum tt_state state;
	char peer[INET6_ADDRSTRLEN + 8]; /* "[addr]:port" */
	char err[512];
};

/* Deadlines are absolute CLOCK_MONOTONIC milliseconds; -1 means none. */

static int64_t now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static int64_t deadline_after(int timeout_ms)
{
	return timeout_ms < 0 ? -1 : now_ms() + timeout_ms;
}

/// Milliseconds left for poll(): -1 without deadline, 0 once it has passed.
static int remaining_ms(int64_t deadline)
{
	int64_t left;

	if (deadline < 0)
		return -1;
	left = deadline - now_ms();
	if (left <= 0)
		return 0;
	return left > INT_MAX ? INT_MAX : (int)left;
}

/// Waits until fd is ready for events. 1 ready (or in error: the next
/// operation reports it), 0 deadline passed, -1 poll failed (errno).
static int wait_fd(int fd, short events, int64_t deadline)
{
	for (;;) {
		struct pollfd p = { .fd = fd, .events = events };
		int r = poll(&p, 1, remaining_ms(deadline));

		if (r > 0)
			return 1;
		if (r == 0)
			return 0;
		if (errno != EINTR)
			return -1;
	}
}

/* A socket BIO that writes with send(MSG_NOSIGNAL): OpenSSL's own socket BIO
 * uses write(), which raises SIGPIPE when the peer has gone, killing a
 * process that has not ignored it. The fd is kept in the BIO's data pointer
 * and is closed by tapio_tls_close, not by the BIO. */

static BIO_METHOD *nosigpipe_method;
static pthread_once_t nosigpipe_once = PTHREAD_ONCE_INIT;

static int bio_fd(BIO *b)
{
	return (int)(intptr_t)BIO_get_data(b);
}

static int nosigpipe_write(BIO *b, const char *data, size_t len, size_t *written)
{
	ssize_t n;

	BIO_clear_retry_flags(b);
	do
		n = send(bio_fd(b), data, len, MSG_NOSIGNAL);
	while (n < 0 && errno == EINTR);
	if (n < 0) {
		if (errno == EAGAIN || errno == EWOULDBLOCK)
			BIO_set_retry_write(b);
		*written = 0;
		return 0;
	}
	*written = (size_t)n;
	return 1;
}

static int nosigpipe_read(BIO *b, char *data, size_t len, size_t *readbytes)
{
	ssize_t n;

	BIO_clear_retry_flags(b);
	*readbytes = 0;
	do
		n = recv(bio_fd(b), data, len, 0);
	while (n < 0 && errno == EINTR);
	if (n < 0) {
		if (errno == EAGAIN || errno == EWOULDBLOCK)
			BIO_set_retry_read(b);
		return 0;
	}
	if (n == 0) {
		/* Lets libssl tell a truncated stream from a temporary failure. */
		BIO_set_flags(b, BIO_FLAGS_IN_EOF);
		return 0;
	}
	*readbytes = (size_t)n;
	return 1;
}

static long nosigpipe_ctrl(BIO *b, int cmd, long num, void *ptr)
{
	(void)num;
	switch (cmd) {
	case BIO_CTRL_FLUSH:
		return 1;
	case BIO_CTRL_EOF:
		return BIO_test_flags(b, BIO_FLAGS_IN_EOF) != 0;
	case BIO_C_GET_FD:
		if (ptr != NULL)
			*(int *)ptr = bio_fd(b);
		return bio_fd(b);
	default:
		return 0;
	}
}

static void nosigpipe_init(void)
{
	/* Created once and kept for the life of the process: type indexes are a
	 * small global pool, so one method per connection would run out. */
	int index = BIO_get_new_index();
	BIO_METHOD *m;

	if (index == -1)
		return;
	m = BIO_meth_new(index | BIO_TYPE_SOURCE_SINK | BIO_TYPE_DESCRIPTOR, "tapio socket");
	if (m == NULL)
		return;
	if (!BIO_meth_set_write_ex(m, nosigpipe_write) || !BIO_meth_set_read_ex(m, nosigpipe_read) ||
	    !BIO_meth_set_ctrl(m, nosigpipe_ctrl)) {
		BIO_meth_free(m);
		return;
	}
	nosigpipe_method = m;
}

static BIO *nosigpipe_bio(int fd)
{
	BIO *b;

	if (pthread_once(&nosigpipe_once, nosigpipe_init) != 0 || nosigpipe_method == NULL)
		return NULL;
	b = BIO_new(nosigpipe_method);
	if (b == NULL)
		return NULL;
	BIO_set_data(b, (void *)(intptr_t)fd);
	BIO_set_init(b, 1);
	return b;
}

/// Copies host into out without the brackets of "[::1]".
static int unbracket(const char *host, char *out, size_t out_len)
{
	size_t n = strlen(host);

	if (n >= 2 && host[0] == '[' && host[n - 1] == ']') {
		host++;
		n -= 2;
	}
	if (n == 0 || n >= out_len)
		return -1;
	memcpy(out, host, n);
	out[n] = '\0';
	return 0;
}

static int is_ip_literal(const char *s)
{
	unsigned char buf[sizeof(struct in6_addr)];

	return inet_pton(AF_INET, s, buf) == 1 || inet_pton(AF_INET6, s, buf) == 1;
}

static void format_addr(const struct sockaddr *sa, socklen_t len, char *out, size_t out_len)
{
	char host[INET6_ADDRSTRLEN];
	char serv[8];

	if (getnameinfo(sa, len, host, sizeof host, serv, sizeof serv,
	                NI_NUMERICHOST | NI_NUMERICSERV) != 0) {
		snprintf(out, out_len, "?");
		return;
	}
	snprintf(out, out_len, sa->sa_family == AF_INET6 ? "[%s]:%s" : "%s:%s", host, serv);
}

/// Loads the client's certificate and the CA that server certificates must
/// chain to. Reading the files per connection picks up renewed certificates.
static SSL_CTX *make_ctx(const char *ca_file, const char *cert_file, const char *key_file,
                         char *err, size_t err_len)
{
	SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());

	if (ctx == NULL) {
		tt_err(err, err_len, "cannot create TLS context");
		goto fail;
	}
	if (!SSL_CTX_set_min_proto_version(ctx, TLS1_3_VERSION) ||
	    !SSL_CTX_set_max_proto_version(ctx, TLS1_3_VERSION)) {
		tt_err(err, err_len, "cannot restrict TLS context to TLS 1.3");
		goto fail;
	}
	if (!SSL_CTX_load_verify_file(ctx, ca_file)) {
		tt_err(err, err_len, "cannot load CA certificates from '%s'", ca_file);
		goto fail;
	}
	if (cert_file == NULL) /* server authentication only (e.g. the Kubernetes API) */
		goto verify;
	if (!SSL_CTX_use_certificate_chain_file(ctx, cert_file)) {
		tt_err(err, err_len, "cannot load client certificate from '%s'", cert_file);
		goto fail;
	}
	if (!SSL_CTX_use_PrivateKey_file(ctx, key_file, SSL_FILETYPE_PEM)) {
		tt_err(err, err_len, "cannot load client key from '%s'", key_file);
		goto fail;
	}
	if (!SSL_CTX_check_private_key(ctx)) {
		tt_err(err, err_len, "client key '%s' does not match certificate '%s'", key_file,
		       cert_file);
		goto fail;
	}
verify:
	SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, NULL);
	/* Each connection starts a full handshake; tickets are read and dropped. */
	SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
	/* SSL_write returns after each record, so write_all can count progress. */
	SSL_CTX_set_mode(ctx, SSL_MODE_ENABLE_PARTIAL_WRITE);
	return ctx;
fail:
	tt_err_append_openssl(err, err_len);
	SSL_CTX_free(ctx);
	return NULL;
}

/// Connects to the first address of host that accepts within the deadline.
/// Returns the non-blocking fd, or -1 with err listing why each address failed.
static int tcp_connect(const char *host, uint16_t port, int64_t deadline, int timeout_ms,
                       char *peer, size_t peer_len, char *err, size_t err_len)
{
	struct addrinfo hints = { .ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM,
		                  .ai_protocol = IPPROTO_TCP, .ai_flags = AI_NUMERICSERV };
	struct addrinfo *res = NULL;
	char serv[8];
	int rc;

	snprintf(serv, sizeof serv, "%u", (unsigned)port);
	rc = getaddrinfo(host, serv, &hints, &res);
	if (rc != 0) {
		tt_err(err, err_len, "cannot resolve '%s': %s", host,
		       rc == EAI_SYSTEM ? strerror(errno) : gai_strerror(rc));
		return -1;
	}
	tt_err(err, err_len, "cannot connect to %s port %u:", host, (unsigned)port);
	for (struct addrinfo *ai = res; ai != NULL; ai = ai->ai_next) {
		char addr[INET6_ADDRSTRLEN + 8];
		int fd, soerr = 0, one = 1;
		socklen_t soerr_len = sizeof soerr;

		format_addr(ai->ai_addr, ai->ai_addrlen, addr, sizeof addr);
		if (ai != res)
			tt_err_append(err, err_len, ";");
		fd = socket(ai->ai_family, ai->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC,
		            ai->ai_protocol);
		if (fd < 0) {
			tt_err_append(err, err_len, " %s socket: %s", addr, strerror(errno));
			continue;
		}
		if (connect(fd, ai->ai_addr, ai->ai_addrlen) != 0) {
			if (errno != EINPROGRESS) {
				soerr = errno;
			} else {
				int w = wait_fd(fd, POLLOUT, deadline);

				if (w == 0) {
					tt_err_append(err, err_len, " %s timed out after %d ms", addr,
					              timeout_ms);
					close(fd);
					break; /* the whole budget is spent */
				}
				if (w < 0)
					soerr = errno;
				else if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &soerr_len) != 0)
					soerr = errno;
			}
		}
		if (soerr != 0) {
			if (soerr == ECONNREFUSED)
				tt_err_append(err, err_len, " %s refused", addr);
			else
				tt_err_append(err, err_len, " %s %s", addr, strerror(soerr));
			close(fd);
			continue;
		}
		/* Frames are written whole; waiting to coalesce them only adds latency. */
		(void)setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
		snprintf(peer, peer_len, "%s", addr);
		freeaddrinfo(res);
		return fd;
	}
	freeaddrinfo(res);
	return -1;
}

/// Runs the handshake to completion or failure within the deadline.
static int handshake(tapio_tls *tls, const char *name, int64_t deadline, int timeout_ms,
                     const char *ca_file, char *err, size_t err_len)
{
	X509_VERIFY_PARAM *param;
	BIO *bio;
	int ip = is_ip_literal(name);

	tls->ssl = SSL_new(tls->ctx);
	if (tls->ssl == NULL) {
		tt_err(err, err_len, "cannot create TLS connection");
		goto fail_openssl;
	}
	bio = nosigpipe_bio(tls->fd);
	if (bio == NULL) {
		tt_err(err, err_len, "cannot create socket BIO");
		goto fail_openssl;
	}
	SSL_set_bio(tls->ssl, bio, bio);

	if (!ip && !SSL_set_tlsext_host_name(tls->ssl, name)) {
		tt_err(err, err_len, "cannot set SNI '%s'", name);
		goto fail_openssl;
	}
	param = SSL_get0_param(tls->ssl);
	/* A certificate names its server in subjectAltName only, never in CN. */
	X509_VERIFY_PARAM_set_hostflags(param, X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS |
	                                               X509_CHECK_FLAG_NEVER_CHECK_SUBJECT);
	if (!(ip ? X509_VERIFY_PARAM_set1_ip_asc(param, name)
	         : X509_VERIFY_PARAM_set1_host(param, name, 0))) {
		tt_err(err, err_len, "invalid server name '%s'", name);
		goto fail_openssl;
	}

	for (;;) {
		int r, e, w;
		long vr;

		ERR_clear_error();
		errno = 0;
		r = SSL_connect(tls->ssl);
		if (r == 1)
			break;
		e = SSL_get_error(tls->ssl, r);
		if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) {
			w = wait_fd(tls->fd, e == SSL_ERROR_WANT_READ ? POLLIN : POLLOUT, deadline);
			if (w == 0) {
				tt_err(err, err_len, "TLS handshake with %s timed out after %d ms",
				       tls->peer, timeout_ms);
				return -1;
			}
			if (w < 0) {
				tt_err(err, err_len, "TLS handshake with %s: poll: %s", tls->peer,
				       strerror(errno));
				return -1;
			}
			continue;
		}
		vr = SSL_get_verify_result(tls->ssl);
		if (vr != X509_V_OK) {
			tt_err(err, err_len, "server certificate verification failed for %s: %s",
			       tls->peer, X509_verify_cert_error_string(vr));
			if (vr == X509_V_ERR_HOSTNAME_MISMATCH || vr == X509_V_ERR_IP_ADDRESS_MISMATCH)
				tt_err_append(err, err_len, " (certificate is not valid for '%s')", name);
			else if (vr == X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY ||
			         vr == X509_V_ERR_DEPTH_ZERO_SELF_SIGNED_CERT ||
			         vr == X509_V_ERR_SELF_SIGNED_CERT_IN_CHAIN)
				tt_err_append(err, err_len, " (not issued by the CA in '%s')", ca_file);
			ERR_clear_error();
			return -1;
		}
		if (e == SSL_ERROR_SYSCALL && ERR_peek_error() == 0) {
			tt_err(err, err_len, "TLS handshake with %s failed: %s", tls->peer,
			       errno != 0 ? strerror(errno) : "connection closed by peer");
			return -1;
		}
		tt_err(err, err_len, "TLS handshake with %s failed", tls->peer);
		tt_err_append_openssl(err, err_len);
		return -1;
	}
	return 0;
fail_openssl:
	tt_err_append_openssl(err, err_len);
	return -1;
}

static void tls_free(tapio_tls *tls)
{
	SSL_free(tls->ssl); /* frees the BIO too */
	SSL_CTX_free(tls->ctx);
	if (tls->fd >= 0)
		close(tls->fd);
	free(tls);
}

tapio_tls *tapio_tls_connect(const char *host, uint16_t port, const char *server_name,
                             const char *ca_file, const char *cert_file, const char *key_file,
                             int timeout_ms, char *err, size_t err_len)
{
	int64_t deadline = deadline_after(timeout_ms);
	char hostbuf[256], name[256];
	tapio_tls *tls;

	tt_err(err, err_len, "%s", "");
	if (host == NULL || ca_file == NULL || (cert_file == NULL) != (key_file == NULL)) {
		tt_err(err, err_len, "tapio_tls_connect: host, CA and both or neither of certificate and key are required");
		return NULL;
	}
	if (unbracket(host, hostbuf, sizeof hostbuf) != 0 ||
	    unbracket(server_name != NULL ? server_name : host, name, sizeof name) != 0) {
		tt_err(err, err_len, "invalid host or server name '%s'",
		       server_name != NULL ? server_name : host);
		return NULL;
	}
	tls = calloc(1, sizeof *tls);
	if (tls == NULL) {
		tt_err(err, err_len, "out of memory");
		return NULL;
	}
	tls->fd = -1;
	ERR_clear_error();
	/* Files first: a broken setup is reported without touching the network. */
	tls->ctx = make_ctx(ca_file, cert_file, key_file, err, err_len);
	if (tls->ctx == NULL)
		goto fail;
	tls->fd = tcp_connect(hostbuf, port, deadline, timeout_ms, tls->peer, sizeof tls->peer,
	                      err, err_len);
	if (tls->fd < 0)
		goto fail;
	if (handshake(tls, name, deadline, timeout_ms, ca_file, err, err_len) != 0)
		goto fail;
	ERR_clear_error();
	return tls;
fail:
	ERR_clear_error();
	tls_free(tls);
	return NULL;
}

/// Marks the connection dead and records why (plus any OpenSSL reasons).
static long fail(tapio_tls *tls, const char *what, int e)
{
	tls->state = TT_FAILED;
	if (e == SSL_ERROR_SYSCALL && ERR_peek_error() == 0) {
		tt_err(tls->err, sizeof tls->err, "%s: %s", what,
		       errno != 0 ? strerror(errno) : "connection closed by peer");
		return -1;
	}
	tt_err(tls->err, sizeof tls->err, "%s", what);
	tt_err_append_openssl(tls->err, sizeof tls->err);
	return -1;
}

static long closed_result(const tapio_tls *tls)
{
	return tls->state == TT_FAILED ? -1 : -2;
}

long tapio_tls_write_all(tapio_tls *tls, const void *buf, size_t len, int timeout_ms)
{
	int64_t deadline = deadline_after(timeout_ms);
	const unsigned char *p = buf;
	size_t off = 0;

	if (tls == NULL)
		return -1;
	if (tls->state != TT_OPEN) {
		if (tls->state != TT_FAILED)
			tt_err(tls->err, sizeof tls->err, "connection closed by peer");
		return -1;
	}
	if (len == 0)
		return 0;
	if (buf == NULL || len > LONG_MAX) {
		tt_err(tls->err, sizeof tls->err, "tapio_tls_write_all: invalid buffer");
		return -1;
	}
	while (off < len) {
		size_t n = 0;
		int e, w;

		ERR_clear_error();
		errno = 0;
		/* After WANT_*, OpenSSL needs the same pointer and length again: they
		 * are, since off only moves on success. */
		if (SSL_write_ex(tls->ssl, p + off, len - off, &n)) {
			off += n;
			continue;
		}
		e = SSL_get_error(tls->ssl, 0);
		if (e != SSL_ERROR_WANT_WRITE && e != SSL_ERROR_WANT_READ) {
			long r = fail(tls, "TLS write failed", e);

			ERR_clear_error();
			return r;
		}
		w = wait_fd(tls->fd, e == SSL_ERROR_WANT_READ ? POLLIN : POLLOUT, deadline);
		if (w <= 0) {
			tls->state = TT_FAILED;
			if (w == 0)
				tt_err(tls->err, sizeof tls->err,
				       "TLS write timed out after %d ms (%zu of %zu bytes sent)",
				       timeout_ms, off, len);
			else
				tt_err(tls->err, sizeof tls->err, "TLS write: poll: %s", strerror(errno));
			return -1;
		}
	}
	return (long)len;
}

long tapio_tls_read(tapio_tls *tls, void *buf, size_t cap, int timeout_ms)
{
	int64_t deadline = deadline_after(timeout_ms);

	if (tls == NULL)
		return -1;
	if (tls->state != TT_OPEN)
		return closed_result(tls);
	if (buf == NULL || cap == 0) {
		tt_err(tls->err, sizeof tls->err, "tapio_tls_read: empty buffer");
		return -1;
	}
	if (cap > LONG_MAX)
		cap = LONG_MAX;
	for (;;) {
		size_t n = 0;
		unsigned long ossl;
		long r;
		int e, w;

		/* Reading first, polling only when OpenSSL asks for more, returns data
		 * already decrypted and buffered (SSL_pending) without waiting. */
		ERR_clear_error();
		errno = 0;
		if (SSL_read_ex(tls->ssl, buf, cap, &n))
			return (long)n;
		e = SSL_get_error(tls->ssl, 0);
		switch (e) {
		case SSL_ERROR_WANT_READ:
		case SSL_ERROR_WANT_WRITE: /* e.g. answering a KeyUpdate */
			w = wait_fd(tls->fd, e == SSL_ERROR_WANT_READ ? POLLIN : POLLOUT, deadline);
			if (w == 0)
				return 0;
			if (w < 0) {
				tls->state = TT_FAILED;
				tt_err(tls->err, sizeof tls->err, "TLS read: poll: %s", strerror(errno));
				return -1;
			}
			continue;
		case SSL_ERROR_ZERO_RETURN:
			tls->state = TT_PEER_CLOSED;
			tt_err(tls->err, sizeof tls->err, "connection closed by peer");
			ERR_clear_error();
			return -2;
		default:
			ossl = ERR_peek_error();
			if ((e == SSL_ERROR_SYSCALL && ossl == 0 && errno == 0) ||
			    (e == SSL_ERROR_SSL && ERR_GET_LIB(ossl) == ERR_LIB_SSL &&
			     ERR_GET_REASON(ossl) == SSL_R_UNEXPECTED_EOF_WHILE_READING)) {
				/* Frames carry their own lengths, so a missing close_notify
				 * cannot truncate a message unnoticed. */
				tls->state = TT_PEER_EOF;
				tt_err(tls->err, sizeof tls->err,
				       "connection closed by peer (without close_notify)");
				ERR_clear_error();
				return -2;
			}
			r = fail(tls, "TLS read failed", e);
			ERR_clear_error();
			return r;
		}
	}
}

const char *tapio_tls_error(const tapio_tls *tls)
{
	return tls != NULL ? tls->err : "no connection";
}

const char *tapio_tls_protocol(const tapio_tls *tls)
{
	return tls != NULL && tls->ssl != NULL ? SSL_get_version(tls->ssl) : "";
}

const char *tapio_tls_cipher(const tapio_tls *tls)
{
	const char *name = tls != NULL && tls->ssl != NULL ? SSL_get_cipher_name(tls->ssl) : NULL;

	return name != NULL ? name : "";
}

const char *tapio_tls_peer_address(const tapio_tls *tls)
{
	return tls != NULL ? tls->peer : "";
}

int tapio_tls_fd(const tapio_tls *tls)
{
	return tls != NULL ? tls->fd : -1;
}

void tapio_tls_close(tapio_tls *tls)
{
	if (tls == NULL)
		return;
	if (tls->state == TT_OPEN || tls->state == TT_PEER_CLOSED) {
		/* Non-blocking: queues close_notify if the socket takes it, returns
		 * at once either way. The result does not matter to anyone. */
		ERR_clear_error();
		(void)SSL_shutdown(tls->ssl);
		ERR_clear_error();
	}
	tls_free(tls);
}
