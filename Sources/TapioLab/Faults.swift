import Foundation

/// The faults, each with a real kernel or program mechanism, and how each is
/// undone. `inject` returns the revert; a rule or qdisc is also recorded in
/// the state file so cleanup removes it if the run dies first.
extension LabRun {
    func inject(_ f: FaultSpec) throws -> () -> Void {
        let noop: () -> Void = {}
        switch f.type {
        case "memory_fill":
            // The service grows past its memory limit; the kernel's OOM killer ends it.
            let svc = scenario.service(f.target)!
            let mb = Int(f.double("mb") ?? 512)
            if svc.type == .redis {
                let p = try Spawner.spawn(["/usr/bin/python3", options.labDirectory + "/services/redis_fill.py",
                                           "--addr", "\(plan.serviceIP(svc.name)):\(svc.effectivePort!)", "--mb", String(mb),
                                           "--value-kb", String(Int(f.double("value_kb") ?? 1024))],
                                          netns: plan.fabricNetns, cgroups: infraCgroups, log: plan.runDirectory + "/logs/fault-memory_fill.log")
                try track(p, "redis_fill")
                timeline.note("FAULT memory_fill: writing \(mb) MB into \(svc.name) (memory limit \(svc.memoryLimitMb.map { "\($0) MiB" } ?? "none"))")
            } else if svc.type == .api {
                // The service itself grows: a request makes the api's own
                // process allocate, so its process is the one past the limit.
                let port = svc.effectivePort!
                let p = try Spawner.spawn(["/usr/bin/python3", "-c",
                                           "import urllib.request,sys\nr=urllib.request.urlopen(sys.argv[1],timeout=5)\nprint(r.status,r.read().decode().strip())",
                                           "http://\(plan.serviceIP(svc.name)):\(port)/alloc?mb=\(mb)"],
                                          netns: plan.fabricNetns, cgroups: infraCgroups, log: plan.runDirectory + "/logs/fault-memory_fill.log")
                try track(p, "memory_fill")
                timeline.note("FAULT memory_fill: a request makes \(svc.name) allocate \(mb) MB itself (limit \(svc.memoryLimitMb.map { "\($0) MiB" } ?? "none"))")
            } else {
                let p = try Spawner.spawn(["/usr/bin/python3", "-c",
                                           "import time\nx=[]\nfor i in range(\(mb)):\n x.append(bytearray(1<<20))\n time.sleep(0.01)\ntime.sleep(3600)"],
                                          netns: plan.podNetns(svc.name), cgroups: containerCgroups(svc.name),
                                          log: plan.runDirectory + "/logs/fault-memory_fill.log")
                try track(p, "memory_fill")
                timeline.note("FAULT memory_fill: a process in \(svc.name)'s container allocates \(mb) MB (limit \(svc.memoryLimitMb.map { "\($0) MiB" } ?? "none"))")
            }
            return noop

        case "stop":
            // The process serving the port goes away and stays away: connections are refused.
            let s = services[f.target]!
            s.hold()
            s.signal(SIGTERM)
            timeline.note("FAULT stop: \(f.target) stopped (SIGTERM), held down\(f.durationS.map { " for \(Int($0)) s" } ?? "")")
            return { [timeline] in
                s.release()
                timeline.note("REVERT stop: \(f.target) may start again")
            }

        case "kill":
            let s = services[f.target]!
            let sig = Int32(f.double("signal") ?? 9)
            let hold = f.string("restart") == "false"
            if hold { s.hold() }
            s.signal(sig)
            timeline.note("FAULT kill: signal \(sig) to \(f.target)\(hold ? ", no restart" : "")")
            return hold ? { [timeline] in s.release(); timeline.note("REVERT kill: \(f.target) may start again") } : noop

        case "crash_loop":
            // A bad configuration rollout: every start exits 1 until it is fixed.
            let svc = scenario.service(f.target)!
            let s = services[f.target]!
            let config = plan.runDirectory + "/services/\(svc.name)/config.json"
            let good = Shell.read(config)
            if svc.type == .api {
                try Shell.write("{\"service\": \"\(svc.name)\", \"upstream\": ", to: config)
            } else {
                throw LabError("crash_loop needs an api service (it breaks the api's configuration file)")
            }
            s.signal(SIGTERM)
            timeline.note("FAULT crash_loop: \(svc.name)'s configuration replaced by invalid JSON and the process restarted")
            return { [timeline] in
                if let good { try? Shell.write(good, to: config) }
                timeline.note("REVERT crash_loop: \(svc.name)'s configuration restored")
            }

        case "firewall_drop":
            let svc = scenario.service(f.target)!
            let port = Int(f.double("port") ?? Double(svc.effectivePort ?? 0))
            let rule = ["-I", "INPUT", "-d", plan.serviceIP(svc.name), "-p", "tcp", "--dport", String(port), "-j", "DROP"]
            // In the pod's own namespace (where a network policy's rule takes effect).
            return try iptables(netns: plan.podNetns(svc.name), rule, what: "firewall_drop: DROP tcp to \(svc.name):\(port) on \(svc.node)")

        case "packet_loss":
            let svc = scenario.service(f.target)!
            let port = Int(f.double("port") ?? Double(svc.effectivePort ?? 0))
            let p = String(format: "%.3f", (f.double("percent") ?? 30) / 100)
            let ns = plan.podNetns(svc.name)
            let ip = plan.serviceIP(svc.name)
            let r1 = try iptables(netns: ns, ["-I", "INPUT", "-d", ip, "-p", "tcp", "--dport", String(port),
                                              "-m", "statistic", "--mode", "random", "--probability", p, "-j", "DROP"],
                                  what: "packet_loss: \(p) of packets to \(svc.name):\(port) dropped")
            let r2 = try iptables(netns: ns, ["-I", "OUTPUT", "-s", ip, "-p", "tcp", "--sport", String(port),
                                              "-m", "statistic", "--mode", "random", "--probability", p, "-j", "DROP"],
                                  what: "packet_loss: \(p) of packets from \(svc.name):\(port) dropped")
            return { r2(); r1() }

        case "bandwidth":
            let svc = scenario.service(f.target)!
            let ns = plan.podNetns(svc.name)
            let rate = Int(f.double("rate_kbit") ?? 64)
            let burst = f.string("burst") ?? "4kb"
            let latency = Int(f.double("latency_ms") ?? 50)
            try Shell.check(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "eth0", "root", "tbf",
                             "rate", "\(rate)kbit", "burst", burst, "latency", "\(latency)ms"])
            let item = LabState.Item(kind: "qdisc", name: ns, detail: ["eth0"])
            try state.add(item)
            timeline.note("FAULT bandwidth: tbf \(rate) kbit/s on \(svc.name)'s eth0 (its egress, in the pod's namespace on \(svc.node))")
            return { [state, timeline] in
                Shell.run(["ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", "eth0", "root"])
                state.remove(item)
                timeline.note("REVERT bandwidth: tbf removed on \(svc.name)'s eth0")
            }

        case "dns":
            // dnsmasq stops answering the name: NXDOMAIN (record gone) or
            // SERVFAIL (forwarded to a broken upstream); SIGHUP re-reads both files.
            let name = f.target.contains(".") ? f.target : plan.dnsName(f.target)
            let rcode = (f.string("rcode") ?? "NXDOMAIN").uppercased()
            if rcode == "TIMEOUT" {
                // The resolver drops the name's queries: no answer at all, the
                // clients time out and retry. A DROP for UDP to port 53 whose
                // payload carries the name (its wire labels) at the DNS server.
                let rule = ["-I", "INPUT", "-d", LabPlan.dnsIP, "-p", "udp", "--dport", "53", "-m", "string", "--algo", "bm", "--icase",
                            "--hex-string", LabPlan.dnsQueryMatch(name), "-j", "DROP"]
                return try iptables(netns: plan.fabricNetns, rule, what: "dns: queries for \(name) dropped at the resolver (no answer: timeouts)")
            }
            let hosts = hostsFile.split(separator: "\n").filter { !$0.hasSuffix(" " + name) }.map { $0 + "\n" }.joined()
            try Shell.write(hosts, to: dnsDir + "/hosts")
            if rcode == "SERVFAIL" {
                try Shell.write("server=/\(name)/\(LabPlan.dnsIP)#\(LabPlan.badDNSPort)\n", to: dnsDir + "/servers")
            }
            reloadDNS()
            timeline.note("FAULT dns: \(name) answers \(rcode) (dnsmasq reloaded)")
            return { [self] in
                try? Shell.write(hostsFile, to: dnsDir + "/hosts")
                try? Shell.write("", to: dnsDir + "/servers")
                reloadDNS()
                timeline.note("REVERT dns: \(name) resolves again")
            }

        case "cpu_quota":
            let svc = scenario.service(f.target)!
            let file = LabPlan.cgroupV1Mounts["cpu"]! + "/" + plan.podCgroup(svc.name) + "/cpu.cfs_quota_us"
            let before = Shell.read(file)?.trimmingCharacters(in: .whitespacesAndNewlines) ?? "-1"
            let pct = f.double("pct") ?? 5
            try Shell.write(String(Int(pct * 1000)), to: file)
            timeline.note("FAULT cpu_quota: \(svc.name) limited to \(pct)% of a CPU (cfs_quota_us \(Int(pct * 1000)) per 100 ms)")
            return { [timeline] in
                try? Shell.write(before, to: file)
                timeline.note("REVERT cpu_quota: \(svc.name) quota back to \(before)")
            }

        case "start":
            let s = services[f.target]!
            // A service stopped by an earlier `start`'s revert (a soak
            // repeats its activities) may run and restart again.
            s.release()
            try s.start()
            timeline.note("FAULT start: \(f.target) started on \(scenario.service(f.target)!.node) (pid \(s.pid ?? 0))")
            return { [timeline] in
                s.hold()
                s.signal(SIGTERM)
                timeline.note("REVERT start: \(f.target) stopped")
            }

        case "scale":
            // A Deployment scaled up and down: the replica (a service declared
            // `start: on_fault`) starts, and once it listens its address joins
            // the DNS name of the service it replicates (a Service's endpoints,
            // round-robin in nginx's resolver). Scaled down the Kubernetes way:
            // the endpoint leaves first, the pod is stopped (SIGTERM) after a
            // drain longer than the resolver's 1 s cache.
            let svc = scenario.service(f.target)!
            let s = services[f.target]!
            guard let joins = f.string("joins"), let joined = scenario.service(joins) else {
                throw LabError("scale needs params.joins: the service whose name the replica joins")
            }
            let line = "\(plan.serviceIP(svc.name)) \(plan.dnsName(joined.name))"
            s.release()
            try s.start()
            let ready = waitForListener(svc, timeout: 10)
            extraHosts.append(line)
            try Shell.write(hostsFile, to: dnsDir + "/hosts")
            reloadDNS()
            timeline.note("FAULT scale: \(svc.name) started on \(svc.node) (pid \(s.pid ?? 0)), \(ready ? "listening" : "not listening after 10 s"); joins \(plan.dnsName(joined.name))")
            let drain = f.double("drain_s") ?? 2.5
            return { [self] in
                extraHosts.removeAll { $0 == line }
                try? Shell.write(hostsFile, to: dnsDir + "/hosts")
                reloadDNS()
                timeline.note("REVERT scale: \(svc.name) left \(plan.dnsName(joined.name)); stopped in \(drain) s")
                DispatchQueue.global().asyncAfter(deadline: .now() + drain) { [timeline] in
                    s.hold()
                    s.signal(SIGTERM)
                    timeline.note("REVERT scale: \(svc.name) stopped (SIGTERM)")
                }
            }

        case "dns_restart":
            // The node-local DNS cache restarts: dnsmasq gets SIGTERM, is gone
            // for `down_s` and starts again with the same configuration. Queries
            // in the gap are refused (no listener) and retried by the clients.
            let down = f.double("down_s") ?? 0.1
            try restartDNS(downS: down)
            timeline.note("FAULT dns_restart: dnsmasq restarted (down \(down) s, pid \(infra["dnsmasq"]?.pid ?? 0))")
            return noop

        case "disk_fill":
            let svc = scenario.service(f.target)!
            let filler = volume(svc.name) + "/filler"
            let r = Shell.run(["dd", "if=/dev/zero", "of=" + filler, "bs=1M", "status=none"], timeout: 60)
            timeline.note("FAULT disk_fill: \(svc.name)'s \(svc.volumeMb!) MiB volume filled (\(r.output.contains("No space") ? "ENOSPC reached" : r.output))")
            return { [timeline] in
                unlink(filler)
                timeline.note("REVERT disk_fill: filler removed from \(svc.name)'s volume")
            }

        default:
            throw LabError("unknown fault type \(f.type)")
        }
    }

    private func iptables(netns: String, _ rule: [String], what: String) throws -> () -> Void {
        try Shell.check(["ip", "netns", "exec", netns, "iptables"] + rule)
        let item = LabState.Item(kind: "iptables", name: netns, detail: rule)
        try state.add(item)
        timeline.note("FAULT " + what)
        return { [state, timeline] in
            var del = rule
            del[0] = "-D"
            Shell.run(["ip", "netns", "exec", netns, "iptables"] + del)
            state.remove(item)
            timeline.note("REVERT " + what)
        }
    }

    private func track(_ p: Child, _ name: String) throws {
        try state.addProcess(name: name, pid: p.pid)
        helpers.append(p)
    }
}
