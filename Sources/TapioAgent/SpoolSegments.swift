import Foundation
import Synchronization
import TapioWire

/// The agent's spool on disk: sealed batches appended as `SpoolRecord`s to
/// segment files, a group of them with one write and one `fdatasync` of the
/// segment. One file per batch synced with `syncfs` cost a fifth of the
/// agent's CPU under a storm, and `syncfs` flushed the whole filesystem that
/// holds the spool (on a node, its root filesystem) every time.
///
/// The spool directory holds:
/// - `segment-<id>.spool`: records back to back (`<id>`: 16 hex digits,
///   counting up). Only the newest segment of this process is appended to;
///   past `segmentBytes` the next group starts a new one (its creation costs
///   one directory fsync). A segment whose records are all settled
///   (acknowledged, or dropped and counted) is deleted, except the one being
///   appended to: that one is cut back to empty by the next append instead.
/// - `segment-<id>.acks`: one 32-byte mark per settled record of a segment
///   still on disk (offset, epoch, sequence, payload CRC-32, each
///   big-endian, then a CRC-32 of those 28 bytes), so that a restart does not
///   send acknowledged batches again. Written without a sync: a mark lost
///   with the machine only means a batch is sent twice, which the server
///   deduplicates. A mark counts only for the record it names (same offset,
///   epoch, sequence and payload checksum).
/// - `<epoch>-<sequence>.batch` (and `.batch.tmp`): a record each, left by
///   agents before segments; read at start, sent, and deleted when settled.
/// - `quarantine/`: what could not be read, kept for a look.
///
/// Everything here does its own locking; none of it runs under the outbox's
/// lock. A damaged record or torn tail is never returned: every record read
/// back is checked (both CRCs, its length, epoch and sequence).
final class SpoolSegments: Sendable {
    let directory: String
    /// A segment is appended to until it would grow past this (a group larger on its own gets a segment alone).
    let segmentBytes: Int

    private struct Segment {
        /// Bytes in the file (whole records and, found at start, damaged pieces).
        var bytes = 0
        /// Records not settled yet (offset: length), and their bytes.
        var records: [Int: Int] = [:]
        var liveBytes = 0
        var live: Int { records.count }

        mutating func add(_ offset: Int, _ length: Int) {
            if records.updateValue(length, forKey: offset) == nil { liveBytes += length }
        }

        mutating func settle(_ offset: Int) {
            if let length = records.removeValue(forKey: offset) { liveBytes -= length }
        }
        var readFD: Int32 = -1
        var marksFD: Int32 = -1
    }

    private struct Table {
        var segments: [UInt64: Segment] = [:]
        /// The segment appended to (this process's newest).
        var current: UInt64?
        var nextID: UInt64 = 1
    }

    /// The descriptor appends go through. Lock order: `writer`, then `table`.
    private struct Writer {
        var fd: Int32 = -1
        /// The segment's name is durable in the directory.
        var named = false
    }

    private let table = Mutex(Table())
    private let writer = Mutex(Writer())
    private let dead = Atomic<Int>(0)

    init(directory: String, segmentBytes: Int) {
        self.directory = directory
        self.segmentBytes = max(1, segmentBytes)
    }

    deinit {
        writer.withLock { w in if w.fd >= 0 { close(w.fd) } }
        table.withLock { t in
            for s in t.segments.values {
                if s.readFD >= 0 { close(s.readFD) }
                if s.marksFD >= 0 { close(s.marksFD) }
            }
        }
    }

    /// Bytes on disk that hold no unsettled record (an empty segment being
    /// appended to does not count: the next append cuts it back). They count
    /// against the spool's budget until their segment goes.
    var deadBytes: Int { dead.load(ordering: .relaxed) }

    private func segmentPath(_ id: UInt64) -> String { directory + "/segment-" + hex(id) + ".spool" }
    private func marksPath(_ id: UInt64) -> String { directory + "/segment-" + hex(id) + ".acks" }
    private func hex(_ id: UInt64) -> String {
        let digits = String(id, radix: 16)
        return String(repeating: "0", count: max(0, 16 - digits.count)) + digits
    }

    // MARK: - Appending

    struct Record {
        var epoch: UInt64
        var sequence: UInt64
        var events: Int
        var payload: [UInt8]
    }

    /// Appends the records to the current segment with one write and makes
    /// them durable with one `fdatasync` (plus a directory fsync when the
    /// segment is new). Returns where each went; nil for those not kept: when
    /// the disk fills, the records written in full are kept and the rest cut
    /// off; when the sync fails, none is kept.
    func append(_ records: [Record]) -> [SpoolLocation?] {
        guard !records.isEmpty else { return [] }
        var buffer: [UInt8] = []
        buffer.reserveCapacity(records.reduce(0) { $0 + SpoolRecord.headerSize + $1.payload.count })
        var checks: [UInt32] = []
        checks.reserveCapacity(records.count)
        for r in records {
            let header = r.payload.withUnsafeBytes {
                SpoolRecord.header(epoch: r.epoch, sequence: r.sequence, eventCount: UInt32(clamping: r.events), payload: $0)
            }
            checks.append(header[36..<40].reduce(0) { $0 << 8 | UInt32($1) })
            buffer += header
            buffer += r.payload
        }
        let sizes = records.map { SpoolRecord.headerSize + $0.payload.count }
        let failed = [SpoolLocation?](repeating: nil, count: records.count)
        return writer.withLock { w -> [SpoolLocation?] in
            // Where: the current segment's end; its start again when it holds
            // nothing unsettled; a new segment past the size.
            let planned = table.withLock { t -> (id: UInt64, start: Int)? in
                guard let id = t.current, let s = t.segments[id], w.fd >= 0 else { return nil }
                if s.live == 0, s.bytes > 0 {
                    // Marks first: a mark left over must not name a record written next.
                    if s.marksFD >= 0 { _ = ftruncate(s.marksFD, 0) } else { unlink(marksPath(id)) }
                    guard ftruncate(w.fd, 0) == 0 else { return nil }
                    t.segments[id]!.bytes = 0
                    t.segments[id]!.records = [:]
                    t.segments[id]!.liveBytes = 0
                    updateDead(t)
                    return (id, 0)
                }
                if s.bytes == 0 || s.bytes + buffer.count <= segmentBytes { return (id, s.bytes) }
                return nil
            }
            let id: UInt64
            let start: Int
            if let planned {
                (id, start) = planned
            } else {
                // Roll: the old segment stays until its records are settled.
                if w.fd >= 0 { close(w.fd) }
                w.fd = -1
                id = table.withLock { t in
                    if let old = t.current { t.current = nil; deleteIfSettled(old, &t) }
                    defer { t.nextID += 1 }
                    return t.nextID
                }
                let fd = open(segmentPath(id), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
                guard fd >= 0 else { return failed }
                w.fd = fd
                w.named = false
                table.withLock { t in
                    t.segments[id] = Segment()
                    t.current = id
                }
                start = 0
            }
            let written = buffer.withUnsafeBytes { raw -> Int in
                var done = 0
                while done < raw.count {
                    let n = pwrite(w.fd, raw.baseAddress! + done, raw.count - done, off_t(start + done))
                    if n < 0, errno == EINTR { continue }
                    guard n > 0 else { break }
                    done += n
                }
                return done
            }
            var kept = 0
            var keptBytes = 0
            while kept < sizes.count, keptBytes + sizes[kept] <= written {
                keptBytes += sizes[kept]
                kept += 1
            }
            if written != keptBytes { _ = ftruncate(w.fd, off_t(start + keptBytes)) }
            if kept > 0, fdatasync(w.fd) != 0 {
                // What is on disk is unknown now: nothing of the group counts, and
                // later groups go to a new segment.
                _ = ftruncate(w.fd, off_t(start))
                close(w.fd)
                w.fd = -1
                table.withLock { t in
                    t.segments[id]?.bytes = start
                    t.current = nil
                    deleteIfSettled(id, &t)
                    updateDead(t)
                }
                return failed
            }
            if !w.named, kept > 0 {
                syncDirectory(directory)
                w.named = true
            }
            table.withLock { t in
                t.segments[id]?.bytes = start + keptBytes
                var offset = start
                for i in 0..<kept {
                    t.segments[id]?.add(offset, sizes[i])
                    offset += sizes[i]
                }
                updateDead(t)
            }
            var locations = failed
            var offset = start
            for i in 0..<kept {
                locations[i] = .segment(SegmentRecord(segment: id, offset: offset, length: sizes[i], epoch: records[i].epoch,
                                                      sequence: records[i].sequence, payloadCRC: checks[i]))
                offset += sizes[i]
            }
            return locations
        }
    }

    // MARK: - Reading

    struct ReadFailure: Error {
        /// `spool_lost` (gone) or `spool_corrupt` (there, but not the record).
        var reason: String
    }

    /// The payload of the record at `location`, checked: one positioned read
    /// of exactly its bytes.
    func read(_ location: SpoolLocation) -> Result<[UInt8], ReadFailure> {
        switch location {
        case .file(let path, let epoch, let sequence):
            guard let data = FileManager.default.contents(atPath: path) else {
                return .failure(ReadFailure(reason: FileManager.default.fileExists(atPath: path) ? "spool_corrupt" : "spool_lost"))
            }
            guard let record = try? SpoolRecord.decode([UInt8](data)), record.epoch == epoch, record.sequence == sequence else {
                return .failure(ReadFailure(reason: "spool_corrupt"))
            }
            return .success(record.payload)
        case .segment(let r):
            guard let bytes = readBytes(r) else { return .failure(ReadFailure(reason: "spool_lost")) }
            guard let record = try? SpoolRecord.decode(bytes), record.epoch == r.epoch, record.sequence == r.sequence else {
                return .failure(ReadFailure(reason: "spool_corrupt"))
            }
            return .success(record.payload)
        }
    }

    /// The bytes where the record should be (fewer when the file is shorter);
    /// nil when the segment is gone. Under the table's lock, so that its
    /// descriptor is not closed meanwhile.
    private func readBytes(_ r: SegmentRecord) -> [UInt8]? {
        table.withLock { t -> [UInt8]? in
            var fd = t.segments[r.segment]?.readFD ?? -1
            if fd < 0 {
                fd = open(segmentPath(r.segment), O_RDONLY | O_CLOEXEC)
                guard fd >= 0 else { return nil }
                if t.segments[r.segment] != nil { t.segments[r.segment]!.readFD = fd }
            }
            defer { if t.segments[r.segment]?.readFD != fd { close(fd) } }
            var bytes = [UInt8](repeating: 0, count: max(0, r.length))
            let got = bytes.withUnsafeMutableBytes { raw -> Int in
                var done = 0
                while done < raw.count {
                    let n = pread(fd, raw.baseAddress! + done, raw.count - done, off_t(r.offset + done))
                    if n < 0, errno == EINTR { continue }
                    guard n > 0 else { break }
                    done += n
                }
                return done
            }
            bytes.removeLast(bytes.count - got)
            return bytes
        }
    }

    // MARK: - Settling

    /// The batches at these locations are settled (acknowledged, or dropped
    /// and counted): a segment left with none unsettled is deleted (unless
    /// appended to); otherwise marks keep a restart from resending them. A
    /// file of an older agent is deleted.
    func release(_ locations: [SpoolLocation]) {
        var files: [String] = []
        var marks: [UInt64: [UInt8]] = [:]
        for location in locations {
            switch location {
            case .file(let path, _, _): files.append(path)
            case .segment(let r): marks[r.segment, default: []] += Self.mark(r.offset, r.epoch, r.sequence, r.payloadCRC)
            }
        }
        for path in files { unlink(path) }
        guard !marks.isEmpty else { return }
        table.withLock { t in
            for location in locations {
                guard case .segment(let r) = location, t.segments[r.segment] != nil else { continue }
                t.segments[r.segment]!.settle(r.offset)
            }
            for (id, bytes) in marks where t.segments[id] != nil {
                if !deleteIfSettled(id, &t) { writeMarks(id, bytes, &t) }
            }
            updateDead(t)
        }
    }

    /// Like `release`, and when no unsettled record follows it in its
    /// segment, the segment is cut back to the end of the last one that is
    /// left, giving the bytes back to the filesystem (at shutdown, when the
    /// spool is too full to save even the drop counts).
    func releaseFreeing(_ location: SpoolLocation) {
        guard case .segment(let r) = location else { return release([location]) }
        let freed = writer.withLock { w in
            table.withLock { t -> Bool in
                guard var s = t.segments[r.segment], s.records[r.offset] != nil else { return false }
                s.settle(r.offset)
                let end = s.records.reduce(0) { max($0, $1.key + $1.value) }
                guard end <= r.offset else { return false }
                let cut = t.current == r.segment && w.fd >= 0 ? ftruncate(w.fd, off_t(end)) : truncate(segmentPath(r.segment), off_t(end))
                guard cut == 0 else { return false }
                s.bytes = end
                t.segments[r.segment] = s
                deleteIfSettled(r.segment, &t)
                updateDead(t)
                return true
            }
        }
        if !freed { release([location]) }
    }

    /// Deletes a segment with no unsettled record that is not appended to.
    @discardableResult
    private func deleteIfSettled(_ id: UInt64, _ t: inout Table) -> Bool {
        guard let s = t.segments[id], s.live == 0, t.current != id else { return false }
        if s.readFD >= 0 { close(s.readFD) }
        if s.marksFD >= 0 { close(s.marksFD) }
        unlink(segmentPath(id))
        unlink(marksPath(id))
        t.segments[id] = nil
        return true
    }

    private func writeMarks(_ id: UInt64, _ bytes: [UInt8], _ t: inout Table) {
        if t.segments[id]!.marksFD < 0 {
            t.segments[id]!.marksFD = open(marksPath(id), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0o600)
        }
        let fd = t.segments[id]!.marksFD
        guard fd >= 0 else { return }
        // Not synced, and a failure (a full disk) is let be: a lost mark only means a batch is sent again.
        _ = bytes.withUnsafeBytes { write(fd, $0.baseAddress!, $0.count) }
    }

    private func updateDead(_ t: Table) {
        var bytes = 0
        for (id, s) in t.segments where !(id == t.current && s.live == 0) { bytes += max(0, s.bytes - s.liveBytes) }
        dead.store(bytes, ordering: .relaxed)
    }

    static let markSize = 32

    private struct Mark: Hashable {
        var offset: UInt64
        var epoch: UInt64
        var sequence: UInt64
        var payloadCRC: UInt32
    }

    private static func mark(_ offset: Int, _ epoch: UInt64, _ sequence: UInt64, _ payloadCRC: UInt32) -> [UInt8] {
        var out: [UInt8] = []
        out.reserveCapacity(markSize)
        for v in [UInt64(max(0, offset)), epoch, sequence] { for shift in stride(from: 56, through: 0, by: -8) { out.append(UInt8(truncatingIfNeeded: v >> UInt64(shift))) } }
        for shift in stride(from: 24, through: 0, by: -8) { out.append(UInt8(truncatingIfNeeded: payloadCRC >> UInt32(shift))) }
        let check = CRC32.checksum(out[0..<28])
        for shift in stride(from: 24, through: 0, by: -8) { out.append(UInt8(truncatingIfNeeded: check >> UInt32(shift))) }
        return out
    }

    /// The marks of a segment; an entry whose checksum fails is ignored (its batch is sent again).
    private static func marks(_ bytes: [UInt8]) -> Set<Mark> {
        var found = Set<Mark>()
        var i = 0
        while i + markSize <= bytes.count {
            let entry = bytes[i..<(i + markSize)]
            func u64(_ at: Int) -> UInt64 { entry[(i + at)..<(i + at + 8)].reduce(0) { $0 << 8 | UInt64($1) } }
            func u32(_ at: Int) -> UInt32 { entry[(i + at)..<(i + at + 4)].reduce(0) { $0 << 8 | UInt32($1) } }
            if CRC32.checksum(entry[i..<(i + 28)]) == u32(28) {
                found.insert(Mark(offset: u64(0), epoch: u64(8), sequence: u64(16), payloadCRC: u32(24)))
            }
            i += markSize
        }
        return found
    }

    // MARK: - Loading

    /// What a previous process left that cannot be read: counted by the
    /// caller (and the count saved) before `quarantine` moves it away, so
    /// that a crash in between counts it twice at worst, never not at all.
    struct Damage {
        var events: UInt64
        fileprivate var what: What

        fileprivate enum What {
            case piece(segment: UInt64, SpoolRecord.Piece, [UInt8])
            case file(String)
        }
    }

    struct Loaded {
        /// In (epoch, sequence) order, each once.
        var batches: [SpooledBatch] = []
        var damage: [Damage] = []
    }

    /// Scans the spool a previous process left: every intact record not
    /// marked settled is a batch to send; torn tails and damaged records are
    /// returned as damage (with their event count when the header still
    /// tells it, else one). Segments are read once, here; later reads take
    /// only their record's bytes.
    func load() throws -> Loaded {
        var loaded = Loaded()
        let names = try FileManager.default.contentsOfDirectory(atPath: directory)
        var ids: [UInt64] = []
        for name in names where name.hasPrefix("segment-") && name.hasSuffix(".spool") {
            let digits = name.dropFirst("segment-".count).dropLast(".spool".count)
            if digits.count == 16, let id = UInt64(digits, radix: 16) {
                ids.append(id)
            } else {
                loaded.damage.append(Damage(events: 1, what: .file(directory + "/" + name)))
            }
        }
        ids.sort()
        var segments: [UInt64: Segment] = [:]
        for id in ids {
            var segment = Segment()
            let marksData = FileManager.default.contents(atPath: marksPath(id)).map { [UInt8]($0) } ?? []
            let settled = Self.marks(marksData)
            if marksData.count % Self.markSize != 0 {
                // A torn mark at the end would put every later one out of step.
                _ = truncate(marksPath(id), off_t(marksData.count - marksData.count % Self.markSize))
            }
            guard let data = FileManager.default.contents(atPath: segmentPath(id)) else {
                loaded.damage.append(Damage(events: 1, what: .file(segmentPath(id))))
                continue
            }
            let bytes = [UInt8](data)
            segment.bytes = bytes.count
            for piece in bytes.withUnsafeBytes({ SpoolRecord.scan($0) }) {
                let key = Mark(offset: UInt64(piece.offset), epoch: piece.epoch, sequence: piece.sequence, payloadCRC: piece.payloadCRC)
                if settled.contains(key) { continue }
                if piece.intact, let events = piece.eventCount {
                    segment.add(piece.offset, piece.length)
                    loaded.batches.append(SpooledBatch(epoch: piece.epoch, sequence: piece.sequence, events: Int(events),
                                                       payloadBytes: piece.length - SpoolRecord.headerSize,
                                                       location: .segment(SegmentRecord(segment: id, offset: piece.offset, length: piece.length,
                                                                                        epoch: piece.epoch, sequence: piece.sequence,
                                                                                        payloadCRC: piece.payloadCRC))))
                } else {
                    // Exact when the header checks out; otherwise at least one
                    // (only a batch of counts only holds none).
                    loaded.damage.append(Damage(events: UInt64(piece.eventCount ?? 1),
                                                what: .piece(segment: id, piece, Array(bytes[piece.offset..<(piece.offset + piece.length)]))))
                }
            }
            segments[id] = segment
        }
        // Marks whose segment is gone.
        for name in names where name.hasPrefix("segment-") && name.hasSuffix(".acks") {
            let digits = name.dropFirst("segment-".count).dropLast(".acks".count)
            if let id = UInt64(digits, radix: 16), segments[id] != nil { continue }
            unlink(directory + "/" + name)
        }
        loadLegacyFiles(names, into: &loaded)

        // The same batch twice (a record an older agent's rename left behind
        // both ways, or a batch sealed again whose old record's mark was lost):
        // the newest copy is kept.
        loaded.batches.sort { a, b in
            (a.epoch, a.sequence) != (b.epoch, b.sequence) ? (a.epoch, a.sequence) < (b.epoch, b.sequence) : a.location.order < b.location.order
        }
        var unique: [SpooledBatch] = []
        var duplicates: [SpoolLocation] = []
        for b in loaded.batches {
            if let last = unique.last, (last.epoch, last.sequence) == (b.epoch, b.sequence) {
                duplicates.append(last.location)
                unique[unique.count - 1] = b
            } else {
                unique.append(b)
            }
        }
        loaded.batches = unique
        table.withLock { t in
            t.segments = segments
            t.nextID = (ids.last ?? 0) + 1
            updateDead(t)
        }
        release(duplicates)
        table.withLock { t in
            for id in ids where !loaded.damage.contains(where: { $0.segmentID == id }) { deleteIfSettled(id, &t) }
            updateDead(t)
        }
        return loaded
    }

    /// Moves what `load` found damaged to `quarantine/` (a damaged piece of a
    /// segment as a file of its own, and a mark so that it is not counted
    /// again), then deletes segments left with nothing to send.
    func quarantine(_ damage: [Damage]) {
        guard !damage.isEmpty else { return }
        let q = directory + "/quarantine"
        try? FileManager.default.createDirectory(atPath: q, withIntermediateDirectories: true)
        var marked = Set<UInt64>()
        for d in damage {
            switch d.what {
            case .file(let path):
                if rename(path, q + "/" + (path as NSString).lastPathComponent + ".\(wallClockNs())") != 0 { unlink(path) }
            case .piece(let id, let piece, let bytes):
                let name = "segment-\(hex(id))-\(piece.offset).\(wallClockNs())"
                _ = try? Data(bytes).write(to: URL(fileURLWithPath: q + "/" + name))
                table.withLock { t in
                    guard t.segments[id] != nil else { return }
                    writeMarks(id, Self.mark(piece.offset, piece.epoch, piece.sequence, piece.payloadCRC), &t)
                }
                marked.insert(id)
            }
        }
        table.withLock { t in
            for id in marked { deleteIfSettled(id, &t) }
            updateDead(t)
        }
        syncDirectory(directory)
    }

    /// A record that turned out unreadable when its turn came: its bytes are
    /// kept in `quarantine/` and it is settled.
    func quarantine(_ location: SpoolLocation) {
        let q = directory + "/quarantine"
        try? FileManager.default.createDirectory(atPath: q, withIntermediateDirectories: true)
        switch location {
        case .file(let path, _, _):
            if rename(path, q + "/" + (path as NSString).lastPathComponent + ".\(wallClockNs())") != 0 { unlink(path) }
        case .segment(let r):
            if let bytes = readBytes(r) {
                _ = try? Data(bytes).write(to: URL(fileURLWithPath: q + "/segment-\(hex(r.segment))-\(r.offset).\(wallClockNs())"))
            }
            release([location])
        }
    }

    /// Records an older agent left, one file each: kept where they are,
    /// sent, and deleted when settled. A write that a crash interrupted
    /// before its rename is kept when complete; a bare EventBatch (spooled
    /// before records existed) is wrapped in a record first.
    private func loadLegacyFiles(_ names: [String], into loaded: inout Loaded) {
        let dir = directory
        func recordPath(_ epoch: UInt64, _ sequence: UInt64) -> String { "\(dir)/\(epoch)-\(sequence).batch" }
        var seen = Set<String>()
        var bad = Set<String>()
        // Renamed records first, then those a crash left under their temporary name.
        let ordered = names.filter { $0.hasSuffix(".batch") }.sorted() + names.filter { $0.hasSuffix(".batch.tmp") }.sorted()
        for name in ordered {
            let path = dir + "/" + name
            guard let data = FileManager.default.contents(atPath: path) else {
                // Unreadable: nothing is known about it, not even its event count.
                bad.insert(path)
                loaded.damage.append(Damage(events: 1, what: .file(path)))
                continue
            }
            let bytes = [UInt8](data)
            var record: SpoolRecord
            var keptAt = path
            do {
                record = try SpoolRecord.decode(bytes)
            } catch let error as SpoolRecord.DecodeError {
                if !name.hasSuffix(".tmp"), let bare = try? EventBatch.decode(bytes), !bare.events.isEmpty {
                    record = SpoolRecord(epoch: bare.epoch, sequence: bare.sequence, eventCount: UInt32(clamping: bare.events.count), payload: bytes)
                    keptAt = recordPath(record.epoch, record.sequence)
                    if seen.contains(keptAt) { unlink(path); continue }
                    guard (try? writeFileDurably(keptAt, record.encode())) != nil else {
                        bad.insert(path)
                        loaded.damage.append(Damage(events: UInt64(bare.events.count), what: .file(path)))
                        continue
                    }
                    if keptAt != path { unlink(path) }
                } else {
                    bad.insert(path)
                    loaded.damage.append(Damage(events: UInt64(error.eventCount ?? 1), what: .file(path)))
                    continue
                }
            } catch {
                continue
            }
            let final = recordPath(record.epoch, record.sequence)
            if seen.contains(final) {
                // The same batch twice: a completed write whose rename was interrupted, next to its renamed copy.
                unlink(path)
                continue
            }
            if keptAt != final, !bad.contains(final), rename(keptAt, final) == 0 {
                keptAt = final
            }
            seen.insert(final)
            loaded.batches.append(SpooledBatch(epoch: record.epoch, sequence: record.sequence, events: Int(record.eventCount),
                                               payloadBytes: record.payload.count,
                                               location: .file(keptAt, epoch: record.epoch, sequence: record.sequence)))
        }
    }
}

/// Where a spooled batch's record is.
enum SpoolLocation: Sendable, Equatable {
    case segment(SegmentRecord)
    /// A file of its own, left by an agent before segments.
    case file(String, epoch: UInt64, sequence: UInt64)

    /// Older copies first.
    fileprivate var order: (Int, UInt64, Int) {
        switch self {
        case .file: return (0, 0, 0)
        case .segment(let r): return (1, r.segment, r.offset)
        }
    }
}

/// A record in a segment, with what its settle mark names.
struct SegmentRecord: Sendable, Equatable {
    var segment: UInt64
    var offset: Int
    var length: Int
    var epoch: UInt64
    var sequence: UInt64
    var payloadCRC: UInt32
}

/// A batch found in the spool at start.
struct SpooledBatch {
    var epoch: UInt64
    var sequence: UInt64
    var events: Int
    var payloadBytes: Int
    var location: SpoolLocation

    var recordBytes: Int { SpoolRecord.headerSize + payloadBytes }
}

extension SpoolSegments.Damage {
    fileprivate var segmentID: UInt64? {
        if case .piece(let id, _, _) = what { return id }
        return nil
    }
}

struct SpoolError: Error, CustomStringConvertible {
    var description: String
    var errno: Int32
    init(_ description: String, errno: Int32) {
        self.description = "\(description): errno \(errno)"
        self.errno = errno
    }
}

/// Writes a file under a temporary name, syncs it, renames it into place
/// and syncs the directory.
func writeFileDurably(_ path: String, _ bytes: [UInt8]) throws {
    let tmp = path + ".tmp"
    let fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
    guard fd >= 0 else { throw SpoolError("cannot create \(tmp)", errno: errno) }
    func fail(_ what: String) -> SpoolError {
        let error = SpoolError("cannot \(what) \(tmp)", errno: errno)
        close(fd)
        unlink(tmp)
        return error
    }
    var offset = 0
    while offset < bytes.count {
        let n = bytes.withUnsafeBytes { write(fd, $0.baseAddress! + offset, bytes.count - offset) }
        if n < 0, errno == EINTR { continue }
        guard n > 0 else { throw fail("write") }
        offset += n
    }
    guard fsync(fd) == 0 else { throw fail("sync") }
    close(fd)
    guard rename(tmp, path) == 0 else {
        let error = SpoolError("cannot rename \(tmp)", errno: errno)
        unlink(tmp)
        throw error
    }
    syncDirectory((path as NSString).deletingLastPathComponent)
}

func syncDirectory(_ dir: String) {
    let fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
    guard fd >= 0 else { return }
    _ = fsync(fd)
    close(fd)
}
