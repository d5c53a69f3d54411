import CZstd
import Foundation
import TapioWire

#if canImport(Glibc)
import Glibc
#endif

/// Where a record lives: segment id, byte offset of its header, length of
/// header and frame together.
public struct RecordLocation: Sendable, Equatable {
    public var segment: Int64
    public var offset: Int64
    public var length: Int64
}

/// Errors of the segment files, in words.
public struct SegmentError: Error, CustomStringConvertible, Sendable {
    public let description: String
    init(_ description: String) { self.description = description }
}

/// The segment files of the event log (docs/storage.md): append-only files
/// `segments/<id>.seg`, each a header and then records, each record one
/// batch as the agent sent it, compressed as one zstd frame with a content
/// checksum:
///
///     file   = "TAPIOSEG" u32le(version=1) u32le(0) record*
///     record = u32le(0x52504154 "TAPR") u32le(frame length) u32le(raw length) u32le(codec=1 zstd) frame
///
/// The index (SQLite, beside the files) says which record holds which batch;
/// a record the index does not name was never acknowledged and is cut off at
/// the next open. One writer (the store's lock); readers use their own file
/// descriptors, so a segment deleted under a reader fails that read only.
final class SegmentFiles {
    static let fileMagic: [UInt8] = Array("TAPIOSEG".utf8) + [1, 0, 0, 0, 0, 0, 0, 0]
    static let recordMagic: UInt32 = 0x5250_4154
    static let recordHeaderBytes = 16
    /// A record's frame is refused above this (a batch is at most a few MiB).
    static let maxFrameBytes = 256 << 20

    let directory: String
    /// Sealed segments: id → size in bytes.
    private(set) var sealed: [Int64: Int64] = [:]
    private(set) var activeId: Int64 = 0
    private(set) var activeSize: Int64 = 0
    /// When the active segment took its first record (0: none yet).
    private(set) var activeFirstWriteNs: Int64 = 0
    private var activeFd: Int32 = -1
    private let context: OpaquePointer
    private var frameBuffer: [UInt8] = []
    private var writeBuffer: [UInt8] = []

    /// Opens the directory (creating it), cuts the newest segment back to
    /// `indexedEnd(newest id)` — what the index names — and appends to it.
    /// Opened for reading only: nothing is created, cut or appended (a
    /// running server may be writing the newest segment).
    let readOnly: Bool

    init(directory: String, level: Int32 = 1, readOnly: Bool = false, indexedEnd: (Int64) throws -> Int64?) throws {
        self.directory = directory
        self.readOnly = readOnly
        guard let c = tapio_zstd_ctx_new(level) else { throw SegmentError("zstd: cannot create a compression context") }
        context = c
        if !readOnly { try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true) }
        var ids: [Int64] = []
        for name in (try? FileManager.default.contentsOfDirectory(atPath: directory)) ?? [] where name.hasSuffix(".seg") {
            if let id = Int64(name.dropLast(4)) { ids.append(id) }
        }
        ids.sort()
        if readOnly {
            for id in ids { sealed[id] = try Self.size(of: path(id)) }
            activeId = (ids.last ?? 0) + 1
            return
        }
        for id in ids.dropLast() { sealed[id] = try Self.size(of: path(id)) }
        if let newest = ids.last {
            let end = try indexedEnd(newest) ?? Int64(Self.fileMagic.count)
            try openActive(id: newest, truncateTo: max(end, Int64(Self.fileMagic.count)))
        } else {
            try openActive(id: 1, truncateTo: nil)
        }
    }

    deinit {
        if activeFd >= 0 { close(activeFd) }
        tapio_zstd_ctx_free(context)
    }

    func path(_ id: Int64) -> String { Self.path(directory: directory, id) }

    /// `<directory>/<id, 16 digits>.seg`.
    static func path(directory: String, _ id: Int64) -> String {
        (directory as NSString).appendingPathComponent(String(format: "%016lld.seg", id))
    }

    var totalBytes: Int64 { sealed.values.reduce(activeSize, +) }
    var segmentCount: Int { sealed.count + 1 }

    /// Compresses each payload into a record and appends them all with one
    /// write and one fdatasync. On failure the segment is cut back to where
    /// it was: nothing of the call remains.
    func append(_ payloads: [[UInt8]], nowNs: Int64) throws -> [(RecordLocation, rawLength: Int)] {
        guard !readOnly else { throw SegmentError("the store is open for reading only") }
        writeBuffer.removeAll(keepingCapacity: true)
        var out: [(RecordLocation, rawLength: Int)] = []
        out.reserveCapacity(payloads.count)
        for payload in payloads {
            let frame = try compress(payload)
            let offset = activeSize + Int64(writeBuffer.count)
            appendLE(Self.recordMagic)
            appendLE(UInt32(frame))
            appendLE(UInt32(payload.count))
            appendLE(UInt32(1))
            writeBuffer.append(contentsOf: frameBuffer[0..<frame])
            out.append((RecordLocation(segment: activeId, offset: offset, length: Int64(Self.recordHeaderBytes + frame)), payload.count))
        }
        guard !writeBuffer.isEmpty else { return out }
        let before = activeSize
        do {
            try writeAll(activeFd, writeBuffer, at: before)
            guard fdatasync(activeFd) == 0 else { throw SegmentError("fdatasync \(path(activeId)): \(String(cString: strerror(errno)))") }
        } catch {
            _ = ftruncate(activeFd, off_t(before))
            throw error
        }
        activeSize = before + Int64(writeBuffer.count)
        if activeFirstWriteNs == 0 { activeFirstWriteNs = nowNs }
        return out
    }

    /// Cuts the active segment back to `size` (an index commit failed after
    /// the records were written).
    func truncateActive(to size: Int64) {
        if ftruncate(activeFd, off_t(size)) == 0 { activeSize = size }
    }

    /// Seals the active segment and starts the next one when it holds
    /// `maxBytes` or its first record is `maxAgeNs` old.
    func rotateIfNeeded(maxBytes: Int64, maxAgeNs: Int64, nowNs: Int64) throws {
        guard !readOnly else { return }
        let hasRecords = activeSize > Int64(Self.fileMagic.count)
        guard hasRecords, activeSize >= maxBytes || (activeFirstWriteNs > 0 && nowNs - activeFirstWriteNs >= maxAgeNs) else { return }
        try rotate()
    }

    /// Seals the active segment (if it holds anything) and starts the next.
    func rotate() throws {
        guard activeSize > Int64(Self.fileMagic.count) else { return }
        close(activeFd)
        activeFd = -1
        sealed[activeId] = activeSize
        try openActive(id: activeId + 1, truncateTo: nil)
    }

    /// Deletes a sealed segment's file.
    func delete(_ id: Int64) throws {
        guard !readOnly else { throw SegmentError("the store is open for reading only") }
        guard id != activeId else { throw SegmentError("the active segment \(id) cannot be deleted") }
        if unlink(path(id)) != 0 && errno != ENOENT {
            throw SegmentError("unlink \(path(id)): \(String(cString: strerror(errno)))")
        }
        sealed[id] = nil
        syncDirectory()
    }

    private func openActive(id: Int64, truncateTo: Int64?) throws {
        let p = path(id)
        let fd = open(p, O_RDWR | O_CREAT | O_CLOEXEC, 0o640)
        guard fd >= 0 else { throw SegmentError("open \(p): \(String(cString: strerror(errno)))") }
        var size = Int64(lseek(fd, 0, SEEK_END))
        if size < Int64(Self.fileMagic.count) {
            // New (or cut before its header was whole): write the header.
            guard ftruncate(fd, 0) == 0 else { close(fd); throw SegmentError("truncate \(p): \(String(cString: strerror(errno)))") }
            do { try writeAll(fd, Self.fileMagic, at: 0) } catch { close(fd); throw error }
            guard fsync(fd) == 0 else { close(fd); throw SegmentError("fsync \(p): \(String(cString: strerror(errno)))") }
            size = Int64(Self.fileMagic.count)
            syncDirectory()
        } else {
            var magic = [UInt8](repeating: 0, count: Self.fileMagic.count)
            let n = magic.withUnsafeMutableBytes { pread(fd, $0.baseAddress, $0.count, 0) }
            guard n == magic.count, magic == Self.fileMagic else {
                close(fd)
                throw SegmentError("\(p) is not a Tapio segment (version 1)")
            }
            if let cut = truncateTo, cut < size {
                guard ftruncate(fd, off_t(cut)) == 0, fsync(fd) == 0 else {
                    close(fd)
                    throw SegmentError("truncate \(p): \(String(cString: strerror(errno)))")
                }
                size = cut
            }
        }
        activeFd = fd
        activeId = id
        activeSize = size
        activeFirstWriteNs = size > Int64(Self.fileMagic.count) ? wallClockNs() : 0
    }


    private func compress(_ payload: [UInt8]) throws -> Int {
        let bound = Int(tapio_zstd_bound(payload.count))
        if frameBuffer.count < bound { frameBuffer = [UInt8](repeating: 0, count: bound) }
        var message: UnsafePointer<CChar>?
        let n = frameBuffer.withUnsafeMutableBytes { dst in
            payload.withUnsafeBytes { src in
                tapio_zstd_compress(context, dst.baseAddress, dst.count, src.baseAddress, src.count, &message)
            }
        }
        guard n >= 0 else { throw SegmentError("zstd: \(message.map { String(cString: $0) } ?? "compression failed")") }
        return Int(n)
    }

    private func appendLE(_ v: UInt32) {
        writeBuffer.append(UInt8(truncatingIfNeeded: v))
        writeBuffer.append(UInt8(truncatingIfNeeded: v >> 8))
        writeBuffer.append(UInt8(truncatingIfNeeded: v >> 16))
        writeBuffer.append(UInt8(truncatingIfNeeded: v >> 24))
    }

    private func writeAll(_ fd: Int32, _ bytes: [UInt8], at offset: Int64) throws {
        try bytes.withUnsafeBytes { buf in
            var done = 0
            while done < buf.count {
                let n = pwrite(fd, buf.baseAddress! + done, buf.count - done, off_t(offset + Int64(done)))
                if n < 0 {
                    if errno == EINTR { continue }
                    throw SegmentError("write \(directory): \(String(cString: strerror(errno)))")
                }
                done += n
            }
        }
    }

    private func syncDirectory() {
        let fd = open(directory, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        if fd >= 0 {
            _ = fsync(fd)
            close(fd)
        }
    }

    static func size(of path: String) throws -> Int64 {
        var st = stat()
        guard stat(path, &st) == 0 else { throw SegmentError("stat \(path): \(String(cString: strerror(errno)))") }
        return Int64(st.st_size)
    }
}

/// Reads records with file descriptors of its own (one per segment it
/// touched), closed when it goes away. Not shared between threads.
final class SegmentReader {
    private let files: (Int64) -> String
    private var fds: [Int64: Int32] = [:]
    private var frame: [UInt8] = []

    init(path: @escaping (Int64) -> String) {
        files = path
    }

    deinit {
        for fd in fds.values { close(fd) }
    }

    /// The payload of the record at `location`; nil when its segment is
    /// gone (deleted by retention after the index was read).
    func read(_ location: RecordLocation, rawLength: Int) throws -> [UInt8]? {
        let fd: Int32
        if let cached = fds[location.segment] {
            fd = cached
        } else {
            let p = files(location.segment)
            let opened = open(p, O_RDONLY | O_CLOEXEC)
            if opened < 0 {
                if errno == ENOENT { return nil }
                throw SegmentError("open \(p): \(String(cString: strerror(errno)))")
            }
            fds[location.segment] = opened
            fd = opened
        }
        let length = Int(location.length)
        guard length > SegmentFiles.recordHeaderBytes, length - SegmentFiles.recordHeaderBytes <= SegmentFiles.maxFrameBytes,
              rawLength >= 0, rawLength <= SegmentFiles.maxFrameBytes * 4 else {
            throw SegmentError("segment \(location.segment) offset \(location.offset): record length \(length) out of range")
        }
        if frame.count < length { frame = [UInt8](repeating: 0, count: length) }
        let n = frame.withUnsafeMutableBytes { pread(fd, $0.baseAddress, length, off_t(location.offset)) }
        guard n == length else {
            throw SegmentError("segment \(location.segment) offset \(location.offset): short read (\(n) of \(length) bytes)")
        }
        let magic = UInt32(frame[0]) | UInt32(frame[1]) << 8 | UInt32(frame[2]) << 16 | UInt32(frame[3]) << 24
        let frameLength = Int(UInt32(frame[4]) | UInt32(frame[5]) << 8 | UInt32(frame[6]) << 16 | UInt32(frame[7]) << 24)
        guard magic == SegmentFiles.recordMagic, frameLength == length - SegmentFiles.recordHeaderBytes else {
            throw SegmentError("segment \(location.segment) offset \(location.offset): not a record")
        }
        var out = [UInt8](repeating: 0, count: rawLength)
        var message: UnsafePointer<CChar>?
        let got = out.withUnsafeMutableBytes { dst in
            frame.withUnsafeBytes { src in
                tapio_zstd_decompress(dst.baseAddress, dst.count, src.baseAddress! + SegmentFiles.recordHeaderBytes, frameLength, &message)
            }
        }
        guard got == rawLength else {
            throw SegmentError("segment \(location.segment) offset \(location.offset): \(message.map { String(cString: $0) } ?? "size mismatch")")
        }
        return out
    }
}
