import Foundation
import TapioWire

/// The query methods by name (docs/protocol.md, "Queries"): what a
/// `QueryRequest.method` holds.
public enum QueryMethod: String, Sendable, CaseIterable {
    case events, nodes, pods, incidents, timeline, explain, services, subscribe
}

/// How answers travel: one JSON document per `query_response`, keys sorted,
/// so repeated queries give the same bytes. Server and client use these two,
/// never their own settings.
public enum QueryCoding {
    /// Sorted keys, compact, `/` not escaped.
    public static func encode<T: Encodable>(_ value: T) throws -> [UInt8] {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        return Array(try encoder.encode(value))
    }

    /// The answer as `T`; a document that does not fit says which field and why.
    public static func decode<T: Decodable>(_ type: T.Type, from bytes: [UInt8]) throws -> T {
        do {
            return try JSONDecoder().decode(type, from: Data(bytes))
        } catch let error as DecodingError {
            throw QueryDecodingError(type: "\(type)", reason: describe(error))
        }
    }

    /// `encode` as a `String` (for printing `-o json`).
    public static func string<T: Encodable>(_ value: T) -> String {
        (try? encode(value)).map { String(decoding: $0, as: UTF8.self) } ?? "null"
    }

    static func describe(_ error: DecodingError) -> String {
        func path(_ context: DecodingError.Context) -> String {
            let p = context.codingPath.map { $0.intValue.map { "[\($0)]" } ?? ".\($0.stringValue)" }.joined()
            return p.isEmpty ? "the document" : String(p.drop { $0 == "." })
        }
        switch error {
        case .keyNotFound(let key, let context): return "\(path(context)): missing field \(key.stringValue)"
        case .typeMismatch(let type, let context): return "\(path(context)): expected \(type) (\(context.debugDescription))"
        case .valueNotFound(let type, let context): return "\(path(context)): expected \(type), found null"
        case .dataCorrupted(let context): return "\(path(context)): \(context.debugDescription)"
        @unknown default: return "\(error)"
        }
    }
}

/// An answer that does not have the shape its type describes.
public struct QueryDecodingError: Error, CustomStringConvertible, Sendable {
    public var type: String
    public var reason: String
    public var description: String { "the server's answer is not a \(type): \(reason)" }
}

/// Keys read from a container; lets a type keep fields it does not know.
struct AnyKey: CodingKey {
    var stringValue: String
    var intValue: Int? { nil }
    init(_ s: String) { stringValue = s }
    init?(stringValue: String) { self.stringValue = stringValue }
    init?(intValue: Int) { nil }
}

extension KeyedDecodingContainer {
    /// The field, or `fallback` when it is absent or null: stored incidents
    /// written by older servers lack fields newer ones have.
    func value<T: Decodable>(_ key: Key, or fallback: T) throws -> T {
        try decodeIfPresent(T.self, forKey: key) ?? fallback
    }
}
