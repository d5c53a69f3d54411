// KV buckets the way NATS lays them out: a stream KV_<bucket> over subjects
// $KV.<bucket>.<key>, the last message of a subject being the key's value and
// its stream sequence the key's revision. Enough for a leader lease: put,
// get, create-if-absent and compare-and-set on the revision (the stream
// refuses a write whose expected last subject sequence is stale).

import Foundation

/// A KV bucket's configuration.
public struct KeyValueConfiguration: Sendable {
    public var bucket: String
    /// Values kept per key (1 = only the current one).
    public var history: Int = 1
    /// Values older than this are removed; zero keeps them.
    public var ttl: Duration = .zero
    public var replicas: Int = 1
    public var storage: JetStreamStorage = .file
    /// Largest size of the bucket in bytes; -1 for no limit.
    public var maxBytes: Int64 = -1

    public init(bucket: String) { self.bucket = bucket }
}

/// One key's value and revision.
public struct KeyValueEntry: Sendable, Equatable {
    public var key: String
    public var value: [UInt8]
    /// The stream sequence of this value; the revision a compare-and-set names.
    public var revision: UInt64
}

/// A KV bucket.
public struct KeyValue: Sendable {
    public let jetStream: JetStream
    public let bucket: String
    public var streamName: String { "KV_\(bucket)" }

    /// Opens an existing bucket (no call to the server).
    public init(jetStream: JetStream, bucket: String) throws {
        try KeyValue.validateBucket(bucket)
        self.jetStream = jetStream
        self.bucket = bucket
    }

    /// Sets `key` to `value` whatever it was; the new revision.
    @discardableResult
    public func put(_ key: String, _ value: some Sequence<UInt8>) async throws -> UInt64 {
        try await jetStream.publish(subject(key), payload: value).sequence
    }

    /// Sets `key` only if it has no value yet; JetStreamError 10071 otherwise.
    @discardableResult
    public func create(_ key: String, _ value: some Sequence<UInt8>) async throws -> UInt64 {
        try await update(key, value, revision: 0)
    }

    /// Sets `key` only if its current revision is `revision` (compare-and-set);
    /// JetStreamError 10071 (`wrongLastSequence`) when another write came first.
    @discardableResult
    public func update(_ key: String, _ value: some Sequence<UInt8>, revision: UInt64) async throws -> UInt64 {
        try await jetStream.publish(subject(key), payload: value, expectedLastSubjectSequence: revision).sequence
    }

    /// The current value of `key` from the stream's leader, nil when it has none
    /// (or was deleted or purged).
    public func get(_ key: String) async throws -> KeyValueEntry? {
        guard let stored = try await jetStream.lastMessage(stream: streamName, subject: subject(key)) else { return nil }
        return entry(key, stored)
    }

    /// The current value of `key` from any replica (faster, may lag the leader).
    public func getDirect(_ key: String) async throws -> KeyValueEntry? {
        guard let stored = try await jetStream.lastMessageDirect(stream: streamName, subject: subject(key)) else { return nil }
        return entry(key, stored)
    }

    private func entry(_ key: String, _ stored: StoredMessage) -> KeyValueEntry? {
        if let op = stored.headers["KV-Operation"], op == "DEL" || op == "PURGE" { return nil }
        return KeyValueEntry(key: key, value: stored.payload, revision: stored.sequence)
    }

    private func subject(_ key: String) throws -> String {
        try Self.validateKey(key)
        return "$KV.\(bucket).\(key)"
    }

    static func validateBucket(_ bucket: String) throws {
        guard !bucket.isEmpty, bucket.utf8.count <= 64,
              bucket.utf8.allSatisfy({ isAlphanumeric($0) || $0 == UInt8(ascii: "_") || $0 == UInt8(ascii: "-") }) else {
            throw NATSError.invalidName("invalid KV bucket name '\(bucket)' (letters, digits, _ and - only)")
        }
    }

    /// Keys: letters, digits and `-/_=.`, not starting or ending with a dot.
    static func validateKey(_ key: String) throws {
        let allowed: Set<UInt8> = Set("-/_=.".utf8)
        guard !key.isEmpty, key.utf8.count <= 1024, !key.hasPrefix("."), !key.hasSuffix("."), !key.contains(".."),
              key.utf8.allSatisfy({ isAlphanumeric($0) || allowed.contains($0) }) else {
            throw NATSError.invalidName("invalid KV key '\(key)'")
        }
    }

    private static func isAlphanumeric(_ c: UInt8) -> Bool {
        (c >= 48 && c <= 57) || (c >= 65 && c <= 90) || (c >= 97 && c <= 122)
    }
}

extension JetStream {
    /// Creates the bucket's stream (or updates it to this configuration).
    public func createKeyValue(_ config: KeyValueConfiguration) async throws -> KeyValue {
        try KeyValue.validateBucket(config.bucket)
        guard (1...64).contains(config.history) else { throw NATSError.invalidName("KV history must be 1…64, not \(config.history)") }
        var stream = StreamConfiguration(name: "KV_\(config.bucket)", subjects: ["$KV.\(config.bucket).>"])
        stream.storage = config.storage
        stream.replicas = config.replicas
        stream.maxMessagesPerSubject = Int64(config.history)
        stream.maxAge = config.ttl
        stream.maxBytes = config.maxBytes
        stream.discard = "new"
        stream.allowRollup = true
        stream.denyDelete = true
        stream.allowDirect = true
        // The duplicate window may not exceed the age limit.
        stream.duplicateWindow = config.ttl > .zero && config.ttl < .seconds(120) ? config.ttl : .seconds(120)
        try await createOrUpdateStream(stream)
        return try KeyValue(jetStream: self, bucket: config.bucket)
    }
}
