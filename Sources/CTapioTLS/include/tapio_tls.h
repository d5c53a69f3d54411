/* TLS for Tapio, on the system OpenSSL (libssl, libcrypto).
 *
 * Two halves:
 *   - a TLS 1.3 client connection with mutual authentication, used by the agent
 *     to stream to the server (the server and CLI use swift-nio-ssl instead);
 *   - a development PKI (`tapio certs init`) writing certificates in the
 *     cert-manager secret layout (ca.crt, tls.crt, tls.key), plus helpers that
 *     read the identity (CN = node or operator name, O = role) from a peer
 *     certificate.
 *
 * Conventions:
 *   - Timeouts are in milliseconds. A negative timeout waits without limit; 0
 *     does not wait at all (one non-blocking attempt).
 *   - Nothing here prints. Failures are described in an `err` buffer (always
 *     NUL-terminated when err_len > 0, truncated if too small; 256 bytes is
 *     enough for most, 512 for all) or, for a connection, via tapio_tls_error.
 *   - A tapio_tls is not thread-safe: use it from one thread at a time (it may
 *     move between threads). Separate connections are independent.
 *   - No SIGPIPE is ever raised: the socket is written with MSG_NOSIGNAL.
 *   - No OpenSSL type appears here, so this header imports into Swift as is.
 */
#ifndef TAPIO_TLS_H
#define TAPIO_TLS_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/// One client connection: a non-blocking TCP socket carrying TLS 1.3.
typedef struct tapio_tls tapio_tls;

/// Connects to host:port and completes a TLS 1.3 handshake, all within
/// timeout_ms (name resolution itself is not bounded: use literals or
/// /etc/hosts names where that matters).
///
/// host is a DNS name or an IPv4/IPv6 literal ("::1" or "[::1]"); every
/// address it resolves to is tried in turn. The client presents cert_file
/// (PEM, may hold a chain) with key_file (PEM) and requires a server
/// certificate that chains to ca_file, is valid for TLS server use, and whose
/// subjectAltName matches server_name (or host when server_name is NULL): a DNS
/// entry for a name, an IP entry for a literal. SNI is sent for names only.
/// The subject CN is never used as a fallback identity.
///
/// cert_file and key_file may both be NULL: the client then presents no
/// certificate and only authenticates the server (how the agent reaches the
/// Kubernetes API with the service account's CA and a bearer token).
///
/// The files are read on every call, so renewed certificates are picked up on
/// the next reconnect.
///
/// Returns NULL with a message in err on failure: bad files, "refused",
/// "timed out", "TLS handshake ... failed: <OpenSSL reason>" or "server
/// certificate verification failed: <X509 reason>".
///
/// In TLS 1.3 the server checks the client certificate after the client has
/// finished its handshake, so a server that rejects this client's certificate
/// is seen here as success followed by a failing first read or write (-1,
/// with an alert such as "tlsv13 alert certificate required").
tapio_tls *tapio_tls_connect(const char *host, uint16_t port, const char *server_name,
                             const char *ca_file, const char *cert_file, const char *key_file,
                             int timeout_ms, char *err, size_t err_len);

/// Writes all len bytes or fails, waiting at most timeout_ms in total.
/// Returns len (0 for len 0), or -1 with the reason in tapio_tls_error. After
/// -1 the connection is unusable (a record may be half sent): close it.
long tapio_tls_write_all(tapio_tls *tls, const void *buf, size_t len, int timeout_ms);

/// Reads whatever application data is available, up to cap bytes, waiting at
/// most timeout_ms for some to arrive. Bytes already buffered inside OpenSSL
/// are returned without waiting; TLS 1.3 post-handshake messages (session
/// tickets, key updates) are handled inside and never returned.
/// Returns > 0 bytes read; 0 when nothing arrived in time (the connection is
/// still fine); -1 on error (tapio_tls_error says why; the connection is
/// unusable); -2 when the peer closed (close_notify or TCP EOF), and again on
/// every later call.
long tapio_tls_read(tapio_tls *tls, void *buf, size_t cap, int timeout_ms);

/// The last failure on this connection, or "" if none. Valid until the next
/// call on tls.
const char *tapio_tls_error(const tapio_tls *tls);

/// The negotiated protocol version, "TLSv1.3".
const char *tapio_tls_protocol(const tapio_tls *tls);

/// The negotiated cipher suite, e.g. "TLS_AES_256_GCM_SHA384".
const char *tapio_tls_cipher(const tapio_tls *tls);

/// The numeric address actually connected to, e.g. "127.0.0.1:7400" or
/// "[::1]:7400".
const char *tapio_tls_peer_address(const tapio_tls *tls);

/// The socket (non-blocking), for callers that want to poll it themselves.
/// Readiness alone does not mean application data: call tapio_tls_read with
/// timeout 0. Owned by tls; do not close it.
int tapio_tls_fd(const tapio_tls *tls);

/// Sends close_notify if the socket can take it right now (never waits for the
/// peer's), closes the socket and frees tls. NULL is allowed.
void tapio_tls_close(tapio_tls *tls);

/// Creates a development CA in ca_dir (ca.crt, ca.key), or keeps the one that
/// is there. New CA: ECDSA P-256, self-signed, CN=common_name, basicConstraints
/// CA:TRUE (critical), keyUsage keyCertSign+cRLSign (critical), SKI/AKI,
/// random 128-bit serial, valid 10 years (from one hour ago, to tolerate clock
/// skew). ca_dir is created (0700) if missing; ca.key is 0600.
/// If both files exist, load, and match, they are kept (common_name is then
/// ignored). If only one exists or they cannot be used, this fails rather than
/// replace a CA that other certificates may depend on.
/// Returns 0, or -1 with a message in err.
int tapio_pki_ensure_ca(const char *ca_dir, const char *common_name, char *err, size_t err_len);

/// Issues a leaf certificate signed (SHA-256) by the CA in ca_dir into out_dir,
/// in the cert-manager secret layout: ca.crt (the CA certificate), tls.crt,
/// tls.key (0600). out_dir and missing parents are created 0700. Existing files
/// are replaced atomically (write to a temporary file, then rename).
///
/// Key ECDSA P-256; subject O=organization (the role: "tapio-server",
/// "tapio-node", "tapio-operator"; NULL or "" to omit), CN=common_name;
/// subjectAltName from sans, each "DNS:name" or "IP:address" (IPv4 or IPv6,
/// e.g. "IP:::1"), none at all allowed; extendedKeyUsage serverAuth if
/// is_server else clientAuth; keyUsage digitalSignature (critical);
/// basicConstraints CA:FALSE (critical); SKI/AKI; random 128-bit serial; valid
/// `days` days (1..36500) from one hour ago.
/// Returns 0, or -1 with a message in err.
int tapio_pki_issue(const char *ca_dir, const char *out_dir, const char *common_name,
                    const char *organization, const char *const *sans, size_t n_sans,
                    int is_server, int days, char *err, size_t err_len);

/// Why a peer certificate names no identity (tapio_cert_peer_identity).
enum {
	TAPIO_IDENTITY_OK = 0,
	/// The DER does not parse (or there is none).
	TAPIO_IDENTITY_UNPARSABLE = -1,
	/// The certificate may sign others: basicConstraints CA:TRUE, or keyUsage
	/// with keyCertSign. An issuer is never a peer.
	TAPIO_IDENTITY_CA = -2,
	/// The subject has no CN, or more than one.
	TAPIO_IDENTITY_CN = -3,
	/// The subject has more than one O (the role would be a guess).
	TAPIO_IDENTITY_O = -4,
	/// A CN or O value holds a NUL byte or does not fit its buffer.
	TAPIO_IDENTITY_BAD_VALUE = -5,
};

/// Reads the identity of a peer from its leaf certificate in DER (as a TLS
/// stack hands it over): the subject's only CN into cn and its only O into org
/// (UTF-8, NUL-terminated). org may be NULL to skip it; a missing O gives "".
/// Returns TAPIO_IDENTITY_OK, or one of the reasons above with "" in both and
/// a sentence in err (err may be NULL): a certificate that is a CA, a subject
/// with no or several CNs or several O values, or a value holding a NUL byte
/// or too long for its buffer (values are never truncated) names no one.
/// This does not verify the certificate: use it only on a certificate the TLS
/// stack has already verified.
int tapio_cert_peer_identity(const uint8_t *der, size_t der_len, char *cn, size_t cn_len,
                             char *org, size_t org_len, char *err, size_t err_len);

/// tapio_cert_peer_identity without the reason: 0, or -1.
int tapio_cert_identity(const uint8_t *der, size_t der_len, char *cn, size_t cn_len,
                        char *org, size_t org_len);

/// The CN and O of the first certificate in a PEM file, by the same rules but
/// for the CA check (so it also reads a CA certificate's name).
int tapio_cert_identity_file(const char *pem_path, char *cn, size_t cn_len, char *org,
                             size_t org_len);

#ifdef __cplusplus
}
#endif

#endif
