import Foundation

/// `tapio-lab bench`: every scenario `runs` times, one after another.
public enum LabBench {
    public static func run(scenarios: [Scenario], runs: Int, options: LabOptions, progress: (String) -> Void) throws -> BenchReport {
        var rows: [BenchReport.Row] = []
        var baselineRows: [BenchReport.Row] = []
        var notes = Set<String>()
        var top1: [Double] = [], top1AfterEvidence: [Double] = []
        for scenario in scenarios {
            var reports: [RunReport] = []
            var failed = 0
            for i in 1...max(1, runs) {
                try LabSignals.check()
                progress("bench: \(scenario.name) run \(i)/\(runs)")
                do {
                    let r = try LabRun(scenario: scenario, options: options).run()
                    reports.append(r)
                    // A fault run never answered right counts as the slowest.
                    if !r.healthy {
                        top1.append(r.timeToTop1S ?? .infinity)
                        top1AfterEvidence.append(r.timeToTop1AfterEvidenceS ?? .infinity)
                    }
                    for n in r.notes where n.contains("no `incidents` query") || n.contains("has no --") { notes.insert(n) }
                    progress(String(format: "bench: %@ run %d: AC@1 %.2f AC@3 %.2f (baseline %.2f/%.2f)", scenario.name, i, r.ac1, r.ac3, r.baselineAc1, r.baselineAc3))
                } catch let e as LabError where e.description == LabError.interrupted.description {
                    throw e
                } catch {
                    failed += 1
                    progress("bench: \(scenario.name) run \(i) failed: \(error)")
                }
            }
            rows.append(BenchReport.row(name: scenario.name, reports: reports, failed: failed, baseline: false))
            baselineRows.append(BenchReport.row(name: scenario.name, reports: reports, failed: failed, baseline: true))
        }
        var report = BenchReport(rows: rows, baselineRows: baselineRows, notes: notes.sorted())
        report.top1Times = top1
        report.top1TimesAfterEvidence = top1AfterEvidence
        return report
    }
}
