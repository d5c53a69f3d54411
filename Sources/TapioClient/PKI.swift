import CTapioTLS
import Foundation
import TapioWire

public struct PKIError: Error, CustomStringConvertible {
    public var description: String
    public init(_ description: String) { self.description = description }
}

/// The development PKI of `tapio certs init`: one CA and identities in the
/// cert-manager secret layout (`ca.crt`, `tls.crt`, `tls.key`):
///
///     DIR/ca/            ca.crt, ca.key (kept: re-running adds identities)
///     DIR/server/        CN=tapio-server, O=tapio-server, serverAuth
///     DIR/nodes/<name>/  CN=<name>, O=tapio-node, clientAuth
///     DIR/operators/<n>/ CN=<n>, O=tapio-operator, clientAuth
///
/// The O is the role the server checks; a node's CN is the only node name its
/// agent may claim.
public enum DevelopmentPKI {
    public static let defaultServerNames = [
        "DNS:localhost", "DNS:tapio-server", "DNS:tapio-server.tapio-system.svc",
        "DNS:tapio-server.tapio-system.svc.cluster.local", "IP:127.0.0.1", "IP:::1",
    ]

    public struct Issued: Sendable, Equatable {
        public var role: String
        public var name: String
        public var directory: String
    }

    /// Creates (or reuses) the CA and issues the server, node and operator identities.
    public static func initialize(directory: String, nodes: [String], operators: [String], serverNames: [String] = defaultServerNames, days: Int = 365) throws -> [Issued] {
        for name in nodes + operators {
            guard isValidName(name) else { throw PKIError("invalid name \(name): use letters, digits, '-', '_' and '.'") }
        }
        let caDir = directory + "/ca"
        try call { tapio_pki_ensure_ca(caDir, "tapio development CA", $0, $1) }
        var issued: [Issued] = []
        func issue(_ out: String, cn: String, role: String, sans: [String], server: Bool) throws {
            try withCStrings(sans) { sanPointers in
                try call { tapio_pki_issue(caDir, out, cn, role, sanPointers, sans.count, server ? 1 : 0, Int32(days), $0, $1) }
            }
            issued.append(Issued(role: role, name: cn, directory: out))
        }
        try issue(directory + "/server", cn: "tapio-server", role: "tapio-server", sans: serverNames, server: true)
        for n in nodes { try issue(directory + "/nodes/" + n, cn: n, role: "tapio-node", sans: ["DNS:" + n], server: false) }
        for o in operators { try issue(directory + "/operators/" + o, cn: o, role: "tapio-operator", sans: [], server: false) }
        return issued
    }

    /// Subject CN and O of the first certificate in a PEM file.
    public static func identity(ofCertificateFile path: String) throws -> (commonName: String, role: String) {
        var cn = [CChar](repeating: 0, count: 256)
        var org = [CChar](repeating: 0, count: 256)
        guard tapio_cert_identity_file(path, &cn, cn.count, &org, org.count) == 0 else {
            throw PKIError("cannot read a certificate identity from \(path)")
        }
        func text(_ chars: [CChar]) -> String {
            String(decoding: chars.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
        }
        return (text(cn), text(org))
    }

    static func isValidName(_ name: String) -> Bool {
        !name.isEmpty && name.count <= 63 && name.allSatisfy { $0.isASCII && ($0.isLetter || $0.isNumber || "-_.".contains($0)) }
    }

    private static func call(_ body: (UnsafeMutablePointer<CChar>, Int) -> Int32) throws {
        var err = [CChar](repeating: 0, count: 512)
        let rc = err.withUnsafeMutableBufferPointer { body($0.baseAddress!, $0.count) }
        guard rc == 0 else { throw PKIError(String(cBuffer: err)) }
    }

    private static func withCStrings<R>(_ strings: [String], _ body: (UnsafePointer<UnsafePointer<CChar>?>?) throws -> R) throws -> R {
        let duplicated = strings.map { UnsafePointer(strdup($0)) }
        defer { for p in duplicated { free(UnsafeMutablePointer(mutating: p)) } }
        return try duplicated.withUnsafeBufferPointer { try body($0.baseAddress) }
    }
}
