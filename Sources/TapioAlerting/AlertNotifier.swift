import Foundation
import Logging
import NIOCore
import NIOPosix
import TapioWire

/// Sends incident notifications to Alertmanager, a webhook and an OTLP
/// collector on its own
/// event loop (thread `tapio-alerts`): `incidentsChanged` only hands the
/// incidents over and returns, so the correlation engine never waits for a
/// receiver. Each receiver sends one notification at a time, in order, with
/// retries and backoff (docs/alerts.md); every drop is counted.
public final class AlertNotifier: Sendable {
    public let configuration: AlertingConfiguration
    private let group: MultiThreadedEventLoopGroup
    private let loop: EventLoop
    private let state: NIOLoopBoundBox<State>
    private let logger: Logger
    private let count: @Sendable (String, Int64) -> Void
    /// The resource of the OTLP log records (service.name, host.name).
    private let otlpResource = OTLPLogs.Resource.current

    /// The metric names, with `receiver` (`alertmanager`, `webhook`, `otlp`) and
    /// `endpoint` (host:port) labels; dropped also by `reason`.
    public static let sentMetric = "tapio_alerts_sent_total"
    public static let failedMetric = "tapio_alerts_failed_total"
    public static let droppedMetric = "tapio_alerts_dropped_total"
    public static let dropReasons = ["queue_full", "retries_exhausted", "rejected", "shutdown"]

    /// - Parameter count: adds to a counter (`name{labels}`, value); every
    ///   series is added at 0 here, so each exists from the start.
    public init(configuration: AlertingConfiguration, logger: Logger, count: @escaping @Sendable (String, Int64) -> Void) throws {
        self.configuration = configuration
        self.logger = logger
        self.count = count
        group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        loop = group.next()
        loop.execute { Thread.current.name = "tapio-alerts" }
        let poster = try HTTPPoster(needsTLS: (configuration.alertmanagers + [configuration.webhook, configuration.otlp].compactMap { $0 }).contains(where: \.isTLS),
                                    trustRootsFile: configuration.trustRootsFile)
        if let w = configuration.webhook, configuration.webhookSecret == nil {
            logger.warning("webhook notifications are not signed (no --webhook-secret-file)", metadata: ["webhook": "\(w)"])
        }
        // Alertmanager is given by its base URL; alerts go to its v2 API
        // (a URL that already names the API is taken as it is).
        var receivers: [Receiver] = configuration.alertmanagers.map { t in
            let api = "/api/v2/alerts"
            let path = t.path.split(separator: "?", maxSplits: 1, omittingEmptySubsequences: false)[0]
            return Receiver(kind: .alertmanager, target: path.hasSuffix(api) || path.hasSuffix(api + "/") ? t : t.appending(path: api))
        }
        if let w = configuration.webhook { receivers.append(Receiver(kind: .webhook, target: w)) }
        // OTLP/HTTP: the signal's path is added to the endpoint, as the
        // OpenTelemetry SDKs do with OTEL_EXPORTER_OTLP_ENDPOINT.
        if let o = configuration.otlp {
            let path = o.path.split(separator: "?", maxSplits: 1, omittingEmptySubsequences: false)[0]
            receivers.append(Receiver(kind: .otlp, target: path.hasSuffix("/v1/logs") ? o : o.appending(path: "/v1/logs")))
        }
        for r in receivers {
            for m in [Self.sentMetric, Self.failedMetric] { count(r.series(m), 0) }
            for reason in Self.dropReasons { count(r.series(Self.droppedMetric, reason: reason), 0) }
        }
        state = NIOLoopBoundBox.makeBoxSendingValue(
            State(tracker: AlertTracker(minimumConfidence: configuration.minimumConfidence), receivers: receivers, poster: poster),
            eventLoop: loop)
    }

    /// Incidents open at start (their JSON): taken as announced (see
    /// `AlertTracker.restore`), then the Alertmanager re-sends begin.
    public func start(restoring open: [JSONValue]) {
        let alerts = parse(open)
        loop.execute { [self] in
            state.value.tracker.restore(alerts)
            guard !configuration.alertmanagers.isEmpty else { return }
            // The restored alerts at once (they may have expired while the
            // server was down), then every period.
            resendFiring()
            let period = configuration.resendInterval
            state.value.resend = loop.scheduleRepeatedTask(initialDelay: period, delay: period) { [self] _ in resendFiring() }
        }
    }

    /// The incidents that changed (their JSON as stored): notifications for
    /// those whose alert changed are queued. Never waits.
    public func incidentsChanged(_ incidents: [JSONValue]) {
        guard !incidents.isEmpty else { return }
        let alerts = parse(incidents)
        loop.execute { [self] in
            let notices = state.value.tracker.observe(alerts)
            for n in notices { notify(n) }
        }
    }

    /// Stops the re-sends, lets queued notifications go for up to the
    /// delivery's shutdown grace, counts what is left as dropped
    /// (`reason="shutdown"`) and ends the thread.
    public func shutdown() {
        let deadline = NIODeadline.now() + configuration.delivery.shutdownGrace
        _ = try? loop.submit { [self] in
            state.value.resend?.cancel()
            state.value.resend = nil
        }.wait()
        while NIODeadline.now() < deadline {
            let pending = (try? loop.submit { [self] in state.value.receivers.contains { !$0.queue.isEmpty } }.wait()) ?? false
            if !pending { break }
            usleep(20_000)
        }
        _ = try? loop.submit { [self] in
            state.value.stopped = true
            for r in state.value.receivers {
                r.retry?.cancel()
                if !r.queue.isEmpty { count(r.series(Self.droppedMetric, reason: "shutdown"), Int64(r.queue.count)) }
                r.queue.removeAll()
            }
        }.wait()
        try? group.syncShutdownGracefully()
    }

    // MARK: - On the loop

    private struct State {
        var tracker: AlertTracker
        var receivers: [Receiver]
        let poster: HTTPPoster
        var resend: RepeatedTask?
        var stopped = false
    }

    private func parse(_ incidents: [JSONValue]) -> [IncidentAlert] {
        incidents.compactMap { json in
            do {
                return try IncidentAlert(json: json)
            } catch {
                logger.error("an incident cannot be alerted on", metadata: ["error": "\(error)"])
                return nil
            }
        }
    }

    private func notify(_ notice: AlertTracker.Notice) {
        let now = wallClockNs()
        let linkBase = configuration.linkBase
        logger.info("incident \(notice.event.rawValue)", metadata: ["incident": "\(notice.alert.id)", "title": "\(notice.alert.title)"])
        for r in state.value.receivers {
            switch r.kind {
            case .alertmanager:
                let body = Payloads.alertmanager(notice, nowNs: now, linkBase: linkBase, validForNs: validForNs)
                enqueue(Delivery(body: Array(body.serialized().utf8), event: notice.event.rawValue, id: Self.newDeliveryId()), to: r)
            case .webhook:
                let id = Self.newDeliveryId()
                let body = Payloads.webhook(notice, deliveryId: id, nowNs: now, linkBase: linkBase)
                enqueue(Delivery(body: Array(body.serialized().utf8), event: notice.event.rawValue, id: id), to: r)
            case .otlp:
                let body = OTLPLogs.exportRequest(notice, nowNs: now, linkBase: linkBase, resource: otlpResource)
                enqueue(Delivery(body: body, event: notice.event.rawValue, id: Self.newDeliveryId()), to: r)
            }
        }
    }

    /// Alerts posted to Alertmanager stay firing this long unless posted again.
    private var validForNs: Int64 { 4 * configuration.resendInterval.nanoseconds }

    private func resendFiring() {
        let firing = Array(state.value.tracker.firing.values)
        guard !firing.isEmpty, !state.value.stopped else { return }
        let body = Array(Payloads.alertmanagerResend(firing, nowNs: wallClockNs(), linkBase: configuration.linkBase, validForNs: validForNs).serialized().utf8)
        for r in state.value.receivers where r.kind == .alertmanager {
            // A re-send still waiting in the queue is as good as this one.
            if r.queue.contains(where: { $0.event == "resend" }) { continue }
            enqueue(Delivery(body: body, event: "resend", id: Self.newDeliveryId()), to: r)
        }
    }

    private func enqueue(_ d: Delivery, to r: Receiver) {
        guard !state.value.stopped else {
            count(r.series(Self.droppedMetric, reason: "shutdown"), 1)
            return
        }
        guard r.queue.count < max(1, configuration.delivery.queueCapacity) else {
            count(r.series(Self.droppedMetric, reason: "queue_full"), 1)
            logger.warning("alert queue full: notification dropped", metadata: ["receiver": "\(r.target)", "event": "\(d.event)"])
            return
        }
        r.queue.append(d)
        pump(r)
    }

    private func pump(_ r: Receiver) {
        guard !r.busy, !state.value.stopped, var d = r.queue.first else { return }
        r.busy = true
        d.attempts += 1
        r.queue[0] = d
        var headers: [(String, String)] = []
        if r.kind == .webhook {
            let timestamp = Int64(Date().timeIntervalSince1970)
            headers.append((WebhookSignature.timestampHeader, "\(timestamp)"))
            headers.append((WebhookSignature.deliveryHeader, d.id))
            headers.append((WebhookSignature.eventHeader, d.event))
            if let secret = configuration.webhookSecret {
                headers.append((WebhookSignature.signatureHeader, WebhookSignature.sign(secret: secret, timestamp: timestamp, body: d.body)))
            }
        }
        let index = state.value.receivers.firstIndex { $0 === r }!
        let contentType = r.kind == .otlp ? "application/x-protobuf" : "application/json"
        state.value.poster.post(r.target, contentType: contentType, headers: headers, body: d.body, timeout: configuration.delivery.requestTimeout, on: loop)
            .whenComplete { [self] result in finished(state.value.receivers[index], result) }
    }

    private func finished(_ r: Receiver, _ result: Result<HTTPPoster.Response, Error>) {
        r.busy = false
        guard !state.value.stopped, let d = r.queue.first else { return }
        let outcome: (retry: Bool, why: String)
        switch result {
        case .success(let response) where (200..<300).contains(response.status):
            count(r.series(Self.sentMetric), 1)
            r.queue.removeFirst()
            pump(r)
            return
        case .success(let response):
            outcome = (r.retries(status: response.status), "HTTP \(response.status): \(response.body.prefix(200))")
        case .failure(let error):
            outcome = (true, "\(error)")
        }
        count(r.series(Self.failedMetric), 1)
        let give = !outcome.retry || d.attempts >= max(1, configuration.delivery.maxAttempts)
        logger.warning(give ? "alert notification dropped" : "alert notification failed; retrying", metadata: [
            "receiver": "\(r.target)", "event": "\(d.event)", "attempt": "\(d.attempts)", "error": "\(outcome.why)",
        ])
        if give {
            count(r.series(Self.droppedMetric, reason: outcome.retry ? "retries_exhausted" : "rejected"), 1)
            r.queue.removeFirst()
            pump(r)
            return
        }
        let index = state.value.receivers.firstIndex { $0 === r }!
        r.retry = loop.scheduleTask(in: backoff(afterAttempts: d.attempts)) { [self] in
            let r = state.value.receivers[index]
            r.retry = nil
            pump(r)
        }
    }

    /// initialBackoff × 2^(attempts − 1), at most maximumBackoff.
    func backoff(afterAttempts attempts: Int) -> TimeAmount {
        let d = configuration.delivery
        let shift = min(max(attempts - 1, 0), 30)
        let ns = d.initialBackoff.nanoseconds.multipliedReportingOverflow(by: Int64(1) << shift)
        return .nanoseconds(ns.overflow ? d.maximumBackoff.nanoseconds : min(ns.partialValue, d.maximumBackoff.nanoseconds))
    }

    static func newDeliveryId() -> String {
        WebhookSignature.hex((0..<16).map { _ in UInt8.random(in: 0...255) })
    }
}

/// One notification's HTTP body and its attempts so far.
struct Delivery {
    var body: [UInt8]
    /// opened, updated, resolved, or resend (Alertmanager's periodic re-send).
    var event: String
    var id: String
    var attempts = 0
}

/// One receiver's queue; used on the notifier's loop only.
final class Receiver {
    enum Kind: String { case alertmanager, webhook, otlp }
    let kind: Kind
    let target: AlertTarget
    var queue: [Delivery] = []
    var busy = false
    var retry: Scheduled<Void>?

    init(kind: Kind, target: AlertTarget) {
        self.kind = kind
        self.target = target
    }

    /// Whether an answer with this status is worth another attempt. For
    /// Alertmanager and the webhook: 5xx, 408 and 429 (other 4xx will not
    /// change). For OTLP, what its specification makes retryable: 429, 502,
    /// 503 and 504; any other error is final.
    func retries(status: Int) -> Bool {
        switch kind {
        case .alertmanager, .webhook: return status >= 500 || status == 408 || status == 429 || status < 200
        case .otlp: return [429, 502, 503, 504].contains(status) || status < 200
        }
    }

    func series(_ metric: String, reason: String? = nil) -> String {
        var labels = "receiver=\"\(kind.rawValue)\",endpoint=\"\(escape(target.authority))\""
        if let reason { labels += ",reason=\"\(reason)\"" }
        return "\(metric){\(labels)}"
    }

    private func escape(_ s: String) -> String {
        s.replacingOccurrences(of: "\\", with: "\\\\").replacingOccurrences(of: "\"", with: "\\\"").replacingOccurrences(of: "\n", with: "\\n")
    }
}
