//! Checks of the files people deploy, with the tools that read them: the alert rules
//! (`promtool check rules`, `promtool test rules`), the dashboards (type-checked against
//! `@grafana/schema` with TypeScript), the Kubernetes manifests (`kubernetes-validate`,
//! offline schemas) and the systemd unit (`systemd-analyze verify`). The tools are installed
//! on first use (npm and pip packages, pinned) and reused after.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

const GRAFANA_SCHEMA: &str = "@grafana/schema@13.2.3";
const TYPESCRIPT: &str = "typescript@5.9.3";
const KUBERNETES_VALIDATE: &str = "kubernetes-validate==1.37.0";

/// A named check.
type Check = (&'static str, fn() -> Result<()>);

/// Runs every check; fails on the first that fails, after saying which.
pub fn run() -> Result<()> {
    let checks: [Check; 4] = [
        ("alert rules (promtool)", rules),
        ("dashboards (@grafana/schema)", dashboards),
        ("Kubernetes manifests (kubernetes-validate)", manifests),
        ("systemd unit (systemd-analyze verify)", unit),
    ];
    let mut passed = 0;
    for (name, check) in checks {
        check().with_context(|| format!("deploy check failed: {name}"))?;
        println!("deploy check ok: {name}");
        passed += 1;
    }
    println!("deploy checks: {passed} passed, 0 failed");
    Ok(())
}

fn rules() -> Result<()> {
    let dir = Path::new("deploy/prometheus");
    run_in(dir, "promtool", &["check", "rules", "tracer-alerts.yml"])?;
    run_in(
        dir,
        "promtool",
        &["test", "rules", "tracer-alerts.test.yml"],
    )
}

/// Each dashboard becomes a TypeScript object literal typed as Grafana's `Dashboard`: tsc
/// rejects unknown fields and wrong types.
fn dashboards() -> Result<()> {
    let work = PathBuf::from("target/schema-check");
    std::fs::create_dir_all(&work)?;
    if !work.join("node_modules/@grafana/schema").exists()
        || !work.join("node_modules/.bin/tsc").exists()
    {
        std::fs::write(work.join("package.json"), "{\"private\": true}\n")?;
        run_in(
            &work,
            "npm",
            &[
                "install",
                "--no-audit",
                "--no-fund",
                "--silent",
                GRAFANA_SCHEMA,
                TYPESCRIPT,
            ],
        )?;
    }
    let mut files = Vec::new();
    for entry in std::fs::read_dir("dashboards")?.flatten() {
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "json") {
            let json = std::fs::read_to_string(&path)?;
            let name = format!(
                "{}.ts",
                path.file_stem().unwrap_or_default().to_string_lossy()
            );
            let ts = format!(
                "// Generated from {}: a type check, not code.\nimport type {{ Dashboard }} from '@grafana/schema';\nexport const dashboard: Dashboard = {json};\n",
                path.display()
            );
            std::fs::write(work.join(&name), ts)?;
            files.push(name);
        }
    }
    if files.is_empty() {
        bail!("no dashboards in dashboards/");
    }
    let tsconfig = format!(
        "{{\"compilerOptions\": {{\"strict\": true, \"noEmit\": true, \"module\": \"esnext\", \
         \"moduleResolution\": \"bundler\", \"skipLibCheck\": true, \"target\": \"es2020\"}}, \"files\": {files:?}}}\n"
    );
    std::fs::write(work.join("tsconfig.json"), tsconfig)?;
    run_in(&work, "node_modules/.bin/tsc", &["-p", "."])
}

fn manifests() -> Result<()> {
    let installed = Command::new("kubernetes-validate")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !installed {
        run_in(
            Path::new("."),
            "pip3",
            &[
                "install",
                "--quiet",
                "--disable-pip-version-check",
                KUBERNETES_VALIDATE,
            ],
        )?;
    }
    let mut args = vec!["--strict".to_owned(), "--quiet".to_owned()];
    for entry in std::fs::read_dir("deploy/kubernetes")?.flatten() {
        args.push(entry.path().display().to_string());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run_in(Path::new("."), "kubernetes-validate", &args)
}

/// `systemd-analyze verify` wants the ExecStart binary to exist: point it at the build.
fn unit() -> Result<()> {
    let work = PathBuf::from("target/unit-check");
    std::fs::create_dir_all(&work)?;
    let binary = std::fs::canonicalize("target/release/tracer")
        .context("target/release/tracer (build first)")?;
    let unit = std::fs::read_to_string("deploy/systemd/tracer.service")?
        .replace("/usr/local/bin/tracer", &binary.display().to_string());
    std::fs::write(work.join("tracer.service"), unit)?;
    run_in(&work, "systemd-analyze", &["verify", "tracer.service"])
}

fn run_in(dir: &Path, program: &str, args: &[&str]) -> Result<()> {
    let status = Command::new(program)
        .args(args)
        .current_dir(dir)
        .status()
        .with_context(|| format!("starting {program}"))?;
    if !status.success() {
        bail!("{program} {} failed ({status})", args.join(" "));
    }
    Ok(())
}
