// The JSON of INFO (what the server offers and its limits) and of CONNECT
// (what the client asks for). Only the fields the client uses are named;
// the rest of INFO is ignored.

import Foundation

/// What a server says about itself in INFO.
public struct NATSServerInfo: Sendable, Decodable, Equatable {
    public var serverID: String
    public var serverName: String
    public var version: String
    /// Largest message (payload plus headers) the server accepts, in bytes.
    public var maxPayload: Int
    public var headers: Bool
    public var tlsRequired: Bool
    public var authRequired: Bool
    public var jetStream: Bool
    /// Other servers of the cluster clients may connect to ("host:port").
    public var connectURLs: [String]

    enum CodingKeys: String, CodingKey {
        case serverID = "server_id", serverName = "server_name", version, maxPayload = "max_payload", headers
        case tlsRequired = "tls_required", authRequired = "auth_required", jetStream = "jetstream", connectURLs = "connect_urls"
    }

    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        serverID = try c.decode(String.self, forKey: .serverID)
        serverName = try c.decodeIfPresent(String.self, forKey: .serverName) ?? serverID
        version = try c.decodeIfPresent(String.self, forKey: .version) ?? ""
        maxPayload = try c.decode(Int.self, forKey: .maxPayload)
        headers = try c.decodeIfPresent(Bool.self, forKey: .headers) ?? false
        tlsRequired = try c.decodeIfPresent(Bool.self, forKey: .tlsRequired) ?? false
        authRequired = try c.decodeIfPresent(Bool.self, forKey: .authRequired) ?? false
        jetStream = try c.decodeIfPresent(Bool.self, forKey: .jetStream) ?? false
        connectURLs = try c.decodeIfPresent([String].self, forKey: .connectURLs) ?? []
        guard maxPayload > 0 else {
            throw DecodingError.dataCorruptedError(forKey: .maxPayload, in: c, debugDescription: "max_payload must be positive")
        }
    }
}

/// CONNECT's options. Verbose and pedantic off (no +OK per operation), headers
/// and no_responders on (a request to nothing gets a 503 at once, not a timeout).
struct NATSConnectOptions: Encodable {
    var verbose = false
    var pedantic = false
    var tlsRequired: Bool
    var name: String
    var lang = "swift"
    var version = "tapio"
    var `protocol` = 1
    var echo = true
    var headers = true
    var noResponders = true
    var user: String?
    var pass: String?
    var authToken: String?

    enum CodingKeys: String, CodingKey {
        case verbose, pedantic, tlsRequired = "tls_required", name, lang, version, `protocol`, echo, headers
        case noResponders = "no_responders", user, pass, authToken = "auth_token"
    }
}
