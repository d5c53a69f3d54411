import CTapioTLS
import Foundation

/// The webhook's signature: `X-Tapio-Signature: sha256=<hex>` of
/// HMAC-SHA256(secret, "<X-Tapio-Timestamp>.<body>"), the timestamp being
/// Unix seconds at the attempt. A receiver recomputes it over the raw body,
/// compares in constant time, and refuses a timestamp more than a few
/// minutes from its own clock (a replayed delivery). docs/alerts.md shows
/// the check in a few lines of Python.
public enum WebhookSignature {
    public static let signatureHeader = "X-Tapio-Signature"
    public static let timestampHeader = "X-Tapio-Timestamp"
    public static let deliveryHeader = "X-Tapio-Delivery"
    public static let eventHeader = "X-Tapio-Event"

    /// HMAC-SHA256 of `data` under `key` (32 bytes).
    public static func hmacSHA256(key: [UInt8], data: [UInt8]) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: 32)
        let rc = tapio_hmac_sha256(key, key.count, data, data.count, &out)
        precondition(rc == 0, "HMAC-SHA256 failed in libcrypto")
        return out
    }

    /// The `X-Tapio-Signature` value for a body sent at `timestamp`.
    public static func sign(secret: [UInt8], timestamp: Int64, body: [UInt8]) -> String {
        "sha256=" + hex(hmacSHA256(key: secret, data: Array("\(timestamp).".utf8) + body))
    }

    /// What a receiver does: the signature matches and the timestamp is
    /// within `tolerance` seconds of `now`.
    public static func verify(secret: [UInt8], signature: String, timestamp: String, body: [UInt8],
                              now: Int64 = Int64(Date().timeIntervalSince1970), tolerance: Int64 = 300) -> Bool {
        guard let t = Int64(timestamp), abs(now - t) <= tolerance else { return false }
        let expected = Array(sign(secret: secret, timestamp: t, body: body).utf8)
        let given = Array(signature.utf8)
        guard expected.count == given.count else { return false }
        var diff: UInt8 = 0
        for (x, y) in zip(expected, given) { diff |= x ^ y }
        return diff == 0
    }

    /// The secret from a file: its bytes without trailing whitespace or
    /// newlines (what `echo` or an editor adds to a Kubernetes secret); an
    /// empty secret is refused.
    public static func readSecret(path: String) throws -> [UInt8] {
        guard let data = FileManager.default.contents(atPath: path) else {
            throw AlertTarget.Invalid(description: "cannot read the webhook secret file \(path)")
        }
        var bytes = [UInt8](data)
        while let last = bytes.last, last == 10 || last == 13 || last == 32 || last == 9 { bytes.removeLast() }
        guard !bytes.isEmpty else { throw AlertTarget.Invalid(description: "the webhook secret file \(path) is empty") }
        return bytes
    }

    static func hex(_ bytes: [UInt8]) -> String {
        let digits = Array("0123456789abcdef".utf8)
        var out = [UInt8]()
        out.reserveCapacity(bytes.count * 2)
        for b in bytes {
            out.append(digits[Int(b >> 4)])
            out.append(digits[Int(b & 15)])
        }
        return String(decoding: out, as: UTF8.self)
    }
}
