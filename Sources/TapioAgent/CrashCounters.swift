import CTapioBPF
import Foundation
import TapioWire

/// What one agent process read and what became of it, in a small file the
/// process maps shared (`MAP_SHARED`): every update is a store into the page
/// cache, which outlives the process. After a `kill -9`, an OOM kill or a
/// crash, the next start reads it and reports what the dead process read but
/// never kept as dropped (`agent_killed`, per kind), together with the drop
/// counts no durable batch of the dead process carried.
///
/// Per kind: events read (handed to the outbox) and events accounted for (in
/// a batch synced to the spool or acknowledged by the server, or counted as
/// dropped). Per drop counter (kind, reason): its value now, and its value in
/// the newest durable batch. After a crash,
///
///     agent_killed[kind] = read[kind] − accounted[kind]
///     unreported[key]    = drops[key] − durable[key]
///
/// A power loss (page cache lost) can lose what was written since the last
/// write-back: the agent syncs the file after every spool write and at least
/// once a second, so the events read since then (and the drop counts since
/// then) can go unreported.
///
/// ```
/// offset  size      field (host byte order: the file never leaves the machine)
///      0     4      magic "TPAC"
///      4     4      version: 1
///      8     8      stream epoch of the process
///     16    16      reserved
///     32   128      read[16]       UInt64 per EventKind raw value
///    160   128      accounted[16]  UInt64
///    288   128×48   drop slots: kind UInt32, in use UInt32, reason (24 bytes,
///                   NUL-padded), total UInt64, durable UInt64
/// ```
public final class CrashCounters: @unchecked Sendable {
    public static let magic: [UInt8] = Array("TPAC".utf8)
    public static let version: UInt32 = 1
    static let kinds = 16
    static let slots = 128
    static let reasonBytes = 24
    static let readOffset = 32
    static let accountedOffset = readOffset + 8 * kinds
    static let slotsOffset = accountedOffset + 8 * kinds
    static let slotSize = 48
    static let fileSize = 8192

    public struct Key: Hashable, Sendable {
        public var kind: EventKind
        public var reason: String
        public init(kind: EventKind, reason: String) {
            self.kind = kind
            self.reason = reason
        }
    }

    /// What a previous process's file says.
    public struct Snapshot: Sendable, Equatable {
        public var epoch: UInt64
        public var read: [UInt64]
        public var accounted: [UInt64]
        public var drops: [Key: UInt64]
        public var durable: [Key: UInt64]

        /// Events read and never accounted for, per kind.
        public var killed: [EventKind: UInt64] {
            var out: [EventKind: UInt64] = [:]
            for i in 0..<min(read.count, accounted.count) where read[i] > accounted[i] {
                out[EventKind(rawValue: UInt32(i)) ?? .unspecified, default: 0] &+= read[i] - accounted[i]
            }
            return out
        }

        /// What never reached the server: drop counts no durable batch
        /// carried, and the events lost with the process (`agent_killed`).
        public var unreported: [Key: UInt64] {
            var out: [Key: UInt64] = [:]
            for (key, total) in drops where total > durable[key, default: 0] { out[key] = total - durable[key, default: 0] }
            for (kind, n) in killed {
                let key = Key(kind: kind, reason: "agent_killed")
                out[key] = out[key, default: 0] &+ n
            }
            return out
        }
    }

    public let path: String
    public let epoch: UInt64
    private let base: UnsafeMutableRawPointer
    private var slotIndex: [Key: Int] = [:]
    private var nextSlot = 0

    /// Reads the file a previous process left, nil when there is none or it
    /// is not a counters file.
    public static func load(path: String) -> Snapshot? {
        guard let data = FileManager.default.contents(atPath: path), data.count >= fileSize else { return nil }
        let bytes = [UInt8](data)
        guard Array(bytes[0..<4]) == magic else { return nil }
        return bytes.withUnsafeBytes { raw -> Snapshot? in
            guard raw.loadUnaligned(fromByteOffset: 4, as: UInt32.self) == version else { return nil }
            var s = Snapshot(epoch: raw.loadUnaligned(fromByteOffset: 8, as: UInt64.self), read: [], accounted: [], drops: [:], durable: [:])
            for k in 0..<kinds {
                s.read.append(raw.loadUnaligned(fromByteOffset: readOffset + 8 * k, as: UInt64.self))
                s.accounted.append(raw.loadUnaligned(fromByteOffset: accountedOffset + 8 * k, as: UInt64.self))
            }
            for i in 0..<slots {
                let o = slotsOffset + i * slotSize
                guard raw.loadUnaligned(fromByteOffset: o + 4, as: UInt32.self) == 1 else { continue }
                let kind = EventKind(rawValue: raw.loadUnaligned(fromByteOffset: o, as: UInt32.self)) ?? .unspecified
                let reason = String(decoding: bytes[(o + 8)..<(o + 8 + reasonBytes)].prefix { $0 != 0 }, as: UTF8.self)
                let key = Key(kind: kind, reason: reason)
                s.drops[key, default: 0] &+= raw.loadUnaligned(fromByteOffset: o + 32, as: UInt64.self)
                s.durable[key, default: 0] &+= raw.loadUnaligned(fromByteOffset: o + 40, as: UInt64.self)
            }
            return s
        }
    }

    /// Creates this process's file (replacing any earlier one, which the
    /// caller has recovered) with the drop counters it starts from: written
    /// under a temporary name, mapped, synced, renamed into place.
    public init(path: String, epoch: UInt64, drops: [Key: UInt64]) throws {
        self.path = path
        self.epoch = epoch
        let tmp = path + ".tmp"
        let fd = open(tmp, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw SpoolError("cannot create \(tmp)", errno: errno) }
        defer { close(fd) }
        guard ftruncate(fd, off_t(Self.fileSize)) == 0 else { throw SpoolError("cannot size \(tmp)", errno: errno) }
        guard let p = mmap(nil, Self.fileSize, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0), p != MAP_FAILED else {
            throw SpoolError("cannot map \(tmp)", errno: errno)
        }
        base = p
        for (i, b) in Self.magic.enumerated() { base.storeBytes(of: b, toByteOffset: i, as: UInt8.self) }
        base.storeBytes(of: Self.version, toByteOffset: 4, as: UInt32.self)
        base.storeBytes(of: epoch, toByteOffset: 8, as: UInt64.self)
        for (key, n) in drops { setDrop(key, total: n) }
        guard msync(base, Self.fileSize, MS_SYNC) == 0, rename(tmp, path) == 0 else {
            let e = errno
            munmap(base, Self.fileSize)
            unlink(tmp)
            throw SpoolError("cannot put \(path) in place", errno: e)
        }
        let dirFd = open((path as NSString).deletingLastPathComponent, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        if dirFd >= 0 { _ = fsync(dirFd); close(dirFd) }
    }

    deinit { munmap(base, Self.fileSize) }

    private func slot(_ kind: EventKind) -> Int { Int(kind.rawValue) < Self.kinds ? Int(kind.rawValue) : 0 }

    private func add(_ n: UInt64, at offset: Int) {
        let old = base.load(fromByteOffset: offset, as: UInt64.self)
        base.storeBytes(of: old &+ n, toByteOffset: offset, as: UInt64.self)
    }

    /// One event read: counted before it is handed to the outbox. An atomic
    /// add, so that the ring-buffer reader counts without the outbox's lock
    /// (every other update is made under it).
    func read(_ kind: EventKind) {
        tapio_counter_add((base + Self.readOffset + 8 * slot(kind)).assumingMemoryBound(to: UInt64.self), 1)
    }

    /// Events now kept (durable) or counted as dropped; `sign` −1 takes back
    /// an earlier accounting (a batch sealed again).
    func account(_ counts: KindCounts, negate: Bool = false) {
        for (i, n) in counts.counts.enumerated() where n > 0 {
            add(negate ? 0 &- UInt64(n) : UInt64(n), at: Self.accountedOffset + 8 * i)
        }
    }

    func account(_ kind: EventKind, _ n: UInt64) { add(n, at: Self.accountedOffset + 8 * slot(kind)) }

    private func slotOffset(_ key: Key) -> Int? {
        if let i = slotIndex[key] { return Self.slotsOffset + i * Self.slotSize }
        guard nextSlot < Self.slots else { return nil }
        let i = nextSlot
        nextSlot += 1
        slotIndex[key] = i
        let o = Self.slotsOffset + i * Self.slotSize
        base.storeBytes(of: key.kind.rawValue, toByteOffset: o, as: UInt32.self)
        let reason = Array(key.reason.utf8.prefix(Self.reasonBytes))
        for (j, b) in reason.enumerated() { base.storeBytes(of: b, toByteOffset: o + 8 + j, as: UInt8.self) }
        base.storeBytes(of: UInt32(1), toByteOffset: o + 4, as: UInt32.self)
        return o
    }

    /// The drop counter's value now (kernel and agent, as the next batch would carry it).
    func setDrop(_ key: Key, total: UInt64) {
        guard let o = slotOffset(key) else { return }
        base.storeBytes(of: total, toByteOffset: o + 32, as: UInt64.self)
    }

    /// The counters carried by the newest batch that is durable (spooled or acknowledged).
    func setDurable(_ drops: [Key: UInt64]) {
        for key in Set(slotIndex.keys).union(drops.keys) {
            guard let o = slotOffset(key) else { continue }
            base.storeBytes(of: drops[key, default: 0], toByteOffset: o + 40, as: UInt64.self)
        }
    }

    /// Asks the kernel to write the page back now (for a power loss; a killed
    /// process needs nothing: the page cache keeps the stores).
    func sync() { _ = msync(base, Self.fileSize, MS_SYNC) }

    /// At a clean stop, once everything read is kept or counted elsewhere.
    func remove() {
        unlink(path)
    }
}

/// Events per kind in one batch (index: `EventKind.rawValue`).
struct KindCounts: Sendable {
    var counts = [UInt32](repeating: 0, count: CrashCounters.kinds)

    init() {}

    /// Reads each event's kind in place (a loop over the events themselves
    /// would copy every event, strings retained and released, per batch).
    init(_ events: ArraySlice<TapioEvent>) {
        for index in events.indices {
            let raw = Int(events[index].kind.rawValue)
            counts[raw < CrashCounters.kinds ? raw : 0] &+= 1
        }
    }
}
