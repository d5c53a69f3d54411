/* The development PKI behind `tapio certs init`, and reading the identity
 * (CN, O) out of a peer certificate. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif

#include "tapio_tls.h"
#include "errors.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>

#include <openssl/bio.h>
#include <openssl/bn.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#define CA_DAYS 3650
#define MAX_DAYS 36500
/// notBefore is set this far in the past so that a peer whose clock lags a
/// little still accepts a certificate issued a moment ago.
#define BACKDATE_SECONDS 3600

/// Creates path and its missing parents with mode; existing directories are
/// left as they are.
static int mkdir_p(const char *path, mode_t mode, char *err, size_t err_len)
{
	char buf[PATH_MAX];
	size_t n = strlen(path);
	struct stat st;

	if (n == 0 || n >= sizeof buf) {
		tt_err(err, err_len, "invalid directory '%s'", path);
		return -1;
	}
	memcpy(buf, path, n + 1);
	for (char *p = buf + 1;; p++) {
		if (*p != '/' && *p != '\0')
			continue;
		char saved = *p;

		*p = '\0';
		if (mkdir(buf, mode) != 0 && errno != EEXIST) {
			tt_err(err, err_len, "cannot create directory '%s': %s", buf, strerror(errno));
			return -1;
		}
		*p = saved;
		if (saved == '\0')
			break;
	}
	if (stat(path, &st) != 0 || !S_ISDIR(st.st_mode)) {
		tt_err(err, err_len, "'%s' is not a directory", path);
		return -1;
	}
	return 0;
}

static int join(char *out, size_t out_len, const char *dir, const char *file, char *err,
                size_t err_len)
{
	int n = snprintf(out, out_len, "%s/%s", dir, file);

	if (n < 0 || (size_t)n >= out_len) {
		tt_err(err, err_len, "path too long: '%s/%s'", dir, file);
		return -1;
	}
	return 0;
}

/// Replaces path with the contents of a memory BIO, atomically: readers see the
/// old file or the complete new one, never a partial write, and the file has
/// `mode` from the moment it exists.
static int write_file_atomic(const char *path, BIO *mem, mode_t mode, char *err, size_t err_len)
{
	char tmp[PATH_MAX];
	char *data = NULL;
	long len = BIO_get_mem_data(mem, &data);
	int fd, w;

	if (len <= 0 || data == NULL) {
		tt_err(err, err_len, "nothing to write to '%s'", path);
		return -1;
	}
	/* Beside the target, so rename() stays within one filesystem. */
	w = snprintf(tmp, sizeof tmp, "%s.tmp-XXXXXX", path);
	if (w < 0 || (size_t)w >= sizeof tmp) {
		tt_err(err, err_len, "path too long: '%s'", path);
		return -1;
	}
	fd = mkostemp(tmp, O_CLOEXEC); /* created 0600 */
	if (fd < 0) {
		tt_err(err, err_len, "cannot create '%s': %s", tmp, strerror(errno));
		return -1;
	}
	if (fchmod(fd, mode) != 0) {
		tt_err(err, err_len, "cannot chmod '%s': %s", tmp, strerror(errno));
		goto fail;
	}
	for (long off = 0; off < len;) {
		ssize_t n = write(fd, data + off, (size_t)(len - off));

		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0) {
			tt_err(err, err_len, "cannot write '%s': %s", tmp, strerror(errno));
			goto fail;
		}
		off += n;
	}
	if (fsync(fd) != 0) {
		tt_err(err, err_len, "cannot sync '%s': %s", tmp, strerror(errno));
		goto fail;
	}
	if (close(fd) != 0) {
		fd = -1;
		tt_err(err, err_len, "cannot write '%s': %s", tmp, strerror(errno));
		goto fail;
	}
	fd = -1;
	if (rename(tmp, path) != 0) {
		tt_err(err, err_len, "cannot rename '%s' to '%s': %s", tmp, path, strerror(errno));
		goto fail;
	}
	return 0;
fail:
	if (fd >= 0)
		close(fd);
	unlink(tmp);
	return -1;
}

static int write_cert(const char *path, X509 *cert, char *err, size_t err_len)
{
	BIO *mem = BIO_new(BIO_s_mem());
	int rc = -1;

	if (mem == NULL || !PEM_write_bio_X509(mem, cert)) {
		tt_err(err, err_len, "cannot encode certificate for '%s'", path);
		tt_err_append_openssl(err, err_len);
	} else {
		rc = write_file_atomic(path, mem, 0644, err, err_len);
	}
	BIO_free(mem);
	return rc;
}

static int write_key(const char *path, EVP_PKEY *key, char *err, size_t err_len)
{
	/* secmem: the encoded key is wiped from memory when the BIO is freed. */
	BIO *mem = BIO_new(BIO_s_secmem());
	int rc = -1;

	if (mem == NULL || !PEM_write_bio_PrivateKey(mem, key, NULL, NULL, 0, NULL, NULL)) {
		tt_err(err, err_len, "cannot encode private key for '%s'", path);
		tt_err_append_openssl(err, err_len);
	} else {
		rc = write_file_atomic(path, mem, 0600, err, err_len);
	}
	BIO_free(mem);
	return rc;
}

static X509 *read_cert(const char *path)
{
	BIO *in = BIO_new_file(path, "r");
	X509 *cert = in != NULL ? PEM_read_bio_X509(in, NULL, NULL, NULL) : NULL;

	BIO_free(in);
	return cert;
}

static EVP_PKEY *read_key(const char *path)
{
	BIO *in = BIO_new_file(path, "r");
	EVP_PKEY *key = in != NULL ? PEM_read_bio_PrivateKey(in, NULL, NULL, NULL) : NULL;

	BIO_free(in);
	return key;
}

/// Loads ca_dir/ca.crt and ca_dir/ca.key and checks that they belong together
/// and that the certificate is a CA.
static int load_ca(const char *ca_dir, X509 **cert_out, EVP_PKEY **key_out, char *err,
                   size_t err_len)
{
	char crt_path[PATH_MAX], key_path[PATH_MAX];
	X509 *cert = NULL;
	EVP_PKEY *key = NULL;

	if (join(crt_path, sizeof crt_path, ca_dir, "ca.crt", err, err_len) != 0 ||
	    join(key_path, sizeof key_path, ca_dir, "ca.key", err, err_len) != 0)
		return -1;
	cert = read_cert(crt_path);
	if (cert == NULL) {
		tt_err(err, err_len, "cannot load CA certificate '%s'", crt_path);
		goto fail;
	}
	key = read_key(key_path);
	if (key == NULL) {
		tt_err(err, err_len, "cannot load CA key '%s'", key_path);
		goto fail;
	}
	if (!X509_check_private_key(cert, key)) {
		tt_err(err, err_len, "CA key '%s' does not match '%s'", key_path, crt_path);
		goto fail;
	}
	if (X509_check_ca(cert) != 1) {
		tt_err(err, err_len, "'%s' is not a CA certificate", crt_path);
		goto fail;
	}
	*cert_out = cert;
	*key_out = key;
	return 0;
fail:
	tt_err_append_openssl(err, err_len);
	X509_free(cert);
	EVP_PKEY_free(key);
	return -1;
}

static EVP_PKEY *new_p256_key(char *err, size_t err_len)
{
	EVP_PKEY *key = EVP_PKEY_Q_keygen(NULL, NULL, "EC", "P-256");

	if (key == NULL) {
		tt_err(err, err_len, "cannot generate ECDSA P-256 key");
		tt_err_append_openssl(err, err_len);
	}
	return key;
}

/// A positive, random 128-bit serial number (RFC 5280 allows up to 20 octets).
static int set_random_serial(X509 *cert)
{
	BIGNUM *bn = BN_new();
	int ok = bn != NULL && BN_rand(bn, 128, BN_RAND_TOP_ONE, BN_RAND_BOTTOM_ANY) &&
	         BN_to_ASN1_INTEGER(bn, X509_get_serialNumber(cert)) != NULL;

	BN_free(bn);
	return ok;
}

static int add_name(X509_NAME *name, const char *field, const char *value)
{
	return X509_NAME_add_entry_by_txt(name, field, MBSTRING_UTF8, (const unsigned char *)value,
	                                  -1, -1, 0);
}

/// A version 3 certificate with serial, validity, subject, issuer and public
/// key; extensions and signature still to come.
static X509 *new_cert(EVP_PKEY *key, const X509_NAME *subject, const X509_NAME *issuer, int days)
{
	X509 *cert = X509_new();

	if (cert == NULL || !X509_set_version(cert, X509_VERSION_3) || !set_random_serial(cert) ||
	    X509_gmtime_adj(X509_getm_notBefore(cert), -BACKDATE_SECONDS) == NULL ||
	    X509_time_adj_ex(X509_getm_notAfter(cert), days, 0, NULL) == NULL ||
	    !X509_set_subject_name(cert, subject) || !X509_set_issuer_name(cert, issuer) ||
	    !X509_set_pubkey(cert, key)) {
		X509_free(cert);
		return NULL;
	}
	return cert;
}

/// Adds one extension written in openssl.cnf syntax, e.g. "critical,CA:TRUE".
/// issuer is the CA certificate (the certificate itself when self-signed);
/// AKI reads the issuer's SKI, so SKI must come first on a self-signed one.
static int add_ext(X509 *cert, X509 *issuer, int nid, const char *value)
{
	X509V3_CTX ctx;
	X509_EXTENSION *ext;
	int ok;

	X509V3_set_ctx_nodb(&ctx);
	X509V3_set_ctx(&ctx, issuer, cert, NULL, NULL, 0);
	ext = X509V3_EXT_nconf_nid(NULL, &ctx, nid, value);
	if (ext == NULL)
		return 0;
	ok = X509_add_ext(cert, ext, -1);
	X509_EXTENSION_free(ext);
	return ok;
}

/// Builds subjectAltName from "DNS:name" and "IP:address" entries directly as
/// GENERAL_NAMEs, so a value cannot inject more entries the way it could
/// through the comma-separated config syntax.
static GENERAL_NAMES *parse_sans(const char *const *sans, size_t n_sans, char *err,
                                 size_t err_len)
{
	GENERAL_NAMES *names = sk_GENERAL_NAME_new_null();

	if (names == NULL) {
		tt_err(err, err_len, "out of memory");
		return NULL;
	}
	for (size_t i = 0; i < n_sans; i++) {
		const char *s = sans[i];
		GENERAL_NAME *gen = NULL;

		if (s != NULL && strncasecmp(s, "DNS:", 4) == 0 && s[4] != '\0' &&
		    strspn(s + 4, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_*") ==
		            strlen(s + 4)) {
			ASN1_IA5STRING *dns = ASN1_IA5STRING_new();

			gen = GENERAL_NAME_new();
			if (gen == NULL || dns == NULL || !ASN1_STRING_set(dns, s + 4, -1)) {
				ASN1_IA5STRING_free(dns);
				GENERAL_NAME_free(gen);
				tt_err(err, err_len, "out of memory");
				goto fail;
			}
			GENERAL_NAME_set0_value(gen, GEN_DNS, dns);
		} else if (s != NULL && strncasecmp(s, "IP:", 3) == 0) {
			ASN1_OCTET_STRING *ip = a2i_IPADDRESS(s + 3);

			if (ip == NULL) {
				ERR_clear_error();
				tt_err(err, err_len, "invalid IP address in subjectAltName '%s'", s);
				goto fail;
			}
			gen = GENERAL_NAME_new();
			if (gen == NULL) {
				ASN1_OCTET_STRING_free(ip);
				tt_err(err, err_len, "out of memory");
				goto fail;
			}
			GENERAL_NAME_set0_value(gen, GEN_IPADD, ip);
		} else {
			tt_err(err, err_len,
			       "invalid subjectAltName '%s' (want DNS:name or IP:address)",
			       s != NULL ? s : "(null)");
			goto fail;
		}
		if (!sk_GENERAL_NAME_push(names, gen)) {
			GENERAL_NAME_free(gen);
			tt_err(err, err_len, "out of memory");
			goto fail;
		}
	}
	return names;
fail:
	GENERAL_NAMES_free(names);
	return NULL;
}

int tapio_pki_ensure_ca(const char *ca_dir, const char *common_name, char *err, size_t err_len)
{
	char crt_path[PATH_MAX], key_path[PATH_MAX];
	X509_NAME *name = NULL;
	X509 *cert = NULL;
	EVP_PKEY *key = NULL;
	int have_crt, have_key, rc = -1;

	tt_err(err, err_len, "%s", "");
	if (ca_dir == NULL || common_name == NULL || common_name[0] == '\0') {
		tt_err(err, err_len, "tapio_pki_ensure_ca: directory and common name are required");
		return -1;
	}
	if (join(crt_path, sizeof crt_path, ca_dir, "ca.crt", err, err_len) != 0 ||
	    join(key_path, sizeof key_path, ca_dir, "ca.key", err, err_len) != 0)
		return -1;
	ERR_clear_error();
	have_crt = access(crt_path, F_OK) == 0;
	have_key = access(key_path, F_OK) == 0;
	if (have_crt && have_key) {
		if (load_ca(ca_dir, &cert, &key, err, err_len) == 0) {
			rc = 0;
		} else {
			tt_err_append(err, err_len,
			              "; remove ca.crt and ca.key from '%s' to create a new CA", ca_dir);
		}
		goto out;
	}
	if (have_crt || have_key) {
		tt_err(err, err_len,
		       "incomplete CA in '%s': '%s' is missing; remove the other file to create a new CA",
		       ca_dir, have_crt ? key_path : crt_path);
		goto out;
	}

	if (mkdir_p(ca_dir, 0700, err, err_len) != 0)
		goto out;
	key = new_p256_key(err, err_len);
	if (key == NULL)
		goto out;
	name = X509_NAME_new();
	if (name == NULL || !add_name(name, "CN", common_name)) {
		tt_err(err, err_len, "invalid CA common name '%s'", common_name);
		goto out_openssl;
	}
	cert = new_cert(key, name, name, CA_DAYS);
	if (cert == NULL) {
		tt_err(err, err_len, "cannot create CA certificate");
		goto out_openssl;
	}
	if (!add_ext(cert, cert, NID_basic_constraints, "critical,CA:TRUE") ||
	    !add_ext(cert, cert, NID_key_usage, "critical,keyCertSign,cRLSign") ||
	    !add_ext(cert, cert, NID_subject_key_identifier, "hash") ||
	    !add_ext(cert, cert, NID_authority_key_identifier, "keyid:always")) {
		tt_err(err, err_len, "cannot add CA certificate extensions");
		goto out_openssl;
	}
	if (X509_sign(cert, key, EVP_sha256()) <= 0) {
		tt_err(err, err_len, "cannot sign CA certificate");
		goto out_openssl;
	}
	/* Key first: a crash in between leaves an incomplete CA, which is refused
	 * above, rather than a certificate nobody can sign with. */
	if (write_key(key_path, key, err, err_len) != 0 ||
	    write_cert(crt_path, cert, err, err_len) != 0)
		goto out;
	rc = 0;
	goto out;
out_openssl:
	tt_err_append_openssl(err, err_len);
out:
	ERR_clear_error();
	X509_NAME_free(name);
	X509_free(cert);
	EVP_PKEY_free(key);
	return rc;
}

int tapio_pki_issue(const char *ca_dir, const char *out_dir, const char *common_name,
                    const char *organization, const char *const *sans, size_t n_sans,
                    int is_server, int days, char *err, size_t err_len)
{
	char path[PATH_MAX];
	X509 *ca_cert = NULL, *cert = NULL;
	EVP_PKEY *ca_key = NULL, *key = NULL;
	X509_NAME *name = NULL;
	GENERAL_NAMES *alt = NULL;
	int rc = -1;

	tt_err(err, err_len, "%s", "");
	if (ca_dir == NULL || out_dir == NULL || common_name == NULL || common_name[0] == '\0' ||
	    (n_sans > 0 && sans == NULL)) {
		tt_err(err, err_len, "tapio_pki_issue: directories and common name are required");
		return -1;
	}
	if (days < 1 || days > MAX_DAYS) {
		tt_err(err, err_len, "validity of %d days is out of range (1..%d)", days, MAX_DAYS);
		return -1;
	}
	ERR_clear_error();
	alt = parse_sans(sans, n_sans, err, err_len);
	if (alt == NULL)
		goto out;
	if (load_ca(ca_dir, &ca_cert, &ca_key, err, err_len) != 0)
		goto out;
	if (mkdir_p(out_dir, 0700, err, err_len) != 0)
		goto out;
	key = new_p256_key(err, err_len);
	if (key == NULL)
		goto out;

	name = X509_NAME_new();
	if (name == NULL ||
	    (organization != NULL && organization[0] != '\0' && !add_name(name, "O", organization)) ||
	    !add_name(name, "CN", common_name)) {
		tt_err(err, err_len, "invalid subject O='%s' CN='%s'",
		       organization != NULL ? organization : "", common_name);
		goto out_openssl;
	}
	cert = new_cert(key, name, X509_get_subject_name(ca_cert), days);
	if (cert == NULL) {
		tt_err(err, err_len, "cannot create certificate");
		goto out_openssl;
	}
	if (!add_ext(cert, ca_cert, NID_basic_constraints, "critical,CA:FALSE") ||
	    !add_ext(cert, ca_cert, NID_key_usage, "critical,digitalSignature") ||
	    !add_ext(cert, ca_cert, NID_ext_key_usage, is_server ? "serverAuth" : "clientAuth") ||
	    !add_ext(cert, ca_cert, NID_subject_key_identifier, "hash") ||
	    !add_ext(cert, ca_cert, NID_authority_key_identifier, "keyid:always") ||
	    (sk_GENERAL_NAME_num(alt) > 0 &&
	     !X509_add1_ext_i2d(cert, NID_subject_alt_name, alt, 0, X509V3_ADD_DEFAULT))) {
		tt_err(err, err_len, "cannot add certificate extensions");
		goto out_openssl;
	}
	if (X509_sign(cert, ca_key, EVP_sha256()) <= 0) {
		tt_err(err, err_len, "cannot sign certificate");
		goto out_openssl;
	}
	if (join(path, sizeof path, out_dir, "ca.crt", err, err_len) != 0 ||
	    write_cert(path, ca_cert, err, err_len) != 0 ||
	    join(path, sizeof path, out_dir, "tls.key", err, err_len) != 0 ||
	    write_key(path, key, err, err_len) != 0 ||
	    join(path, sizeof path, out_dir, "tls.crt", err, err_len) != 0 ||
	    write_cert(path, cert, err, err_len) != 0)
		goto out;
	rc = 0;
	goto out;
out_openssl:
	tt_err_append_openssl(err, err_len);
out:
	ERR_clear_error();
	GENERAL_NAMES_free(alt);
	X509_NAME_free(name);
	X509_free(cert);
	EVP_PKEY_free(key);
	X509_free(ca_cert);
	EVP_PKEY_free(ca_key);
	return rc;
}

/// Copies the nid entry of name as UTF-8. At most one is accepted: with two,
/// which one names the peer (or gives its role) would be a guess. Returns
/// TAPIO_IDENTITY_OK (out "" if absent and not required), or why not.
static int name_entry(const X509_NAME *name, int nid, int required, int duplicate_reason,
                      char *out, size_t out_len)
{
	int idx = X509_NAME_get_index_by_NID(name, nid, -1);
	unsigned char *utf8 = NULL;
	int len;

	if (idx < 0)
		return required ? duplicate_reason : TAPIO_IDENTITY_OK;
	if (X509_NAME_get_index_by_NID(name, nid, idx) >= 0)
		return duplicate_reason;
	len = ASN1_STRING_to_UTF8(&utf8, X509_NAME_ENTRY_get_data(X509_NAME_get_entry(name, idx)));
	if (len < 0)
		return TAPIO_IDENTITY_BAD_VALUE;
	if (memchr(utf8, '\0', (size_t)len) != NULL || (size_t)len >= out_len) {
		OPENSSL_free(utf8);
		return TAPIO_IDENTITY_BAD_VALUE;
	}
	memcpy(out, utf8, (size_t)len);
	out[len] = '\0';
	OPENSSL_free(utf8);
	return TAPIO_IDENTITY_OK;
}

/// A certificate that may sign others is an issuer, never a peer: marked a CA
/// in basicConstraints, or allowed keyCertSign in keyUsage.
static int is_issuer(X509 *cert)
{
	uint32_t flags = X509_get_extension_flags(cert); /* also computes the cached extensions */

	if (flags & EXFLAG_INVALID)
		return 1;
	if (flags & EXFLAG_CA)
		return 1;
	return (flags & EXFLAG_KUSAGE) && (X509_get_key_usage(cert) & KU_KEY_CERT_SIGN);
}

static int count_entries(const X509_NAME *name, int nid)
{
	int n = 0;

	for (int idx = -1; (idx = X509_NAME_get_index_by_NID(name, nid, idx)) >= 0;)
		n++;
	return n;
}

static int identity(X509 *cert, int leaf, char *cn, size_t cn_len, char *org, size_t org_len,
                    char *err, size_t err_len)
{
	const X509_NAME *subject = X509_get_subject_name(cert);
	int rc = TAPIO_IDENTITY_OK;

	if (leaf && is_issuer(cert)) {
		rc = TAPIO_IDENTITY_CA;
		tt_err(err, err_len,
		       "the certificate may sign others (basicConstraints CA:TRUE or keyUsage keyCertSign): a CA is not a peer");
	} else if ((rc = name_entry(subject, NID_commonName, 1, TAPIO_IDENTITY_CN, cn, cn_len)) != 0) {
		if (rc == TAPIO_IDENTITY_CN)
			tt_err(err, err_len, "the subject has %d CNs (exactly one names the peer)",
			       count_entries(subject, NID_commonName));
		else
			tt_err(err, err_len, "the subject CN holds a NUL byte or is too long");
	} else if (org != NULL &&
	           (rc = name_entry(subject, NID_organizationName, 0, TAPIO_IDENTITY_O, org, org_len)) != 0) {
		if (rc == TAPIO_IDENTITY_O)
			tt_err(err, err_len, "the subject has %d O values (at most one gives the role)",
			       count_entries(subject, NID_organizationName));
		else
			tt_err(err, err_len, "the subject O holds a NUL byte or is too long");
	}
	if (rc != TAPIO_IDENTITY_OK) {
		cn[0] = '\0';
		if (org != NULL && org_len > 0)
			org[0] = '\0';
	}
	return rc;
}

static int prepare_outputs(char *cn, size_t cn_len, char *org, size_t org_len)
{
	if (cn == NULL || cn_len == 0 || (org != NULL && org_len == 0))
		return -1;
	cn[0] = '\0';
	if (org != NULL)
		org[0] = '\0';
	return 0;
}

int tapio_cert_peer_identity(const uint8_t *der, size_t der_len, char *cn, size_t cn_len,
                             char *org, size_t org_len, char *err, size_t err_len)
{
	const unsigned char *p = der;
	X509 *cert;
	int rc;

	tt_err(err, err_len, "%s", "");
	if (prepare_outputs(cn, cn_len, org, org_len) != 0 || der == NULL || der_len == 0 ||
	    der_len > LONG_MAX) {
		tt_err(err, err_len, "no certificate");
		return TAPIO_IDENTITY_UNPARSABLE;
	}
	cert = d2i_X509(NULL, &p, (long)der_len);
	if (cert == NULL) {
		ERR_clear_error();
		tt_err(err, err_len, "the certificate does not parse");
		return TAPIO_IDENTITY_UNPARSABLE;
	}
	rc = identity(cert, 1, cn, cn_len, org, org_len, err, err_len);
	X509_free(cert);
	ERR_clear_error();
	return rc;
}

int tapio_cert_identity(const uint8_t *der, size_t der_len, char *cn, size_t cn_len,
                        char *org, size_t org_len)
{
	return tapio_cert_peer_identity(der, der_len, cn, cn_len, org, org_len, NULL, 0) == 0 ? 0 : -1;
}

int tapio_cert_identity_file(const char *pem_path, char *cn, size_t cn_len, char *org,
                             size_t org_len)
{
	X509 *cert;
	int rc;

	if (prepare_outputs(cn, cn_len, org, org_len) != 0 || pem_path == NULL)
		return -1;
	cert = read_cert(pem_path);
	if (cert == NULL) {
		ERR_clear_error();
		return -1;
	}
	rc = identity(cert, 0, cn, cn_len, org, org_len, NULL, 0);
	X509_free(cert);
	ERR_clear_error();
	return rc == 0 ? 0 : -1;
}
