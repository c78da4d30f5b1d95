//! The deployment files (no container engine runs here): `docker-compose.yml` parses as YAML
//! (PyYAML, which scripts/test.sh installs when missing) and says what the README says — two kabao
//! nodes on one Redis with AOF `everysec`, behind a round-robin proxy — and the Dockerfile's build
//! step is the README's.

use std::path::Path;
use std::process::Command;

use serde_json::Value;

fn file(name: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(name)).expect(name)
}

/// The compose file as JSON, by way of PyYAML (anchors and merges resolved).
fn compose() -> Value {
    let out = Command::new("python3")
        .args(["-c", "import json, sys, yaml; json.dump(yaml.safe_load(open(sys.argv[1])), sys.stdout)"])
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("docker-compose.yml"))
        .output()
        .expect("python3 runs (scripts/test.sh installs python3-yaml)");
    assert!(out.status.success(), "docker-compose.yml parses: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("JSON from python")
}

#[test]
fn compose_runs_two_nodes_on_one_durable_redis_behind_round_robin() {
    let compose = compose();
    let services = compose["services"].as_object().expect("services");
    let redis = services["redis"]["command"].as_array().expect("redis command");
    let redis: Vec<&str> = redis.iter().filter_map(Value::as_str).collect();
    assert!(redis.windows(2).any(|w| w == ["--appendonly", "yes"]), "{redis:?}");
    assert!(redis.windows(2).any(|w| w == ["--appendfsync", "everysec"]), "{redis:?}");

    let nodes: Vec<&String> = services.keys().filter(|k| k.starts_with("kabao-")).collect();
    assert_eq!(nodes.len(), 2, "two kabao nodes");
    for node in &nodes {
        let env = &services[node.as_str()]["environment"];
        assert_eq!(env["KABAO_REDIS_URL"], "redis://redis:6379", "{node} uses the shared Redis");
        assert_eq!(env["KABAO_LISTEN"], "0.0.0.0:8080");
    }

    let proxy = &services["proxy"];
    assert!(proxy["ports"].as_array().unwrap().iter().any(|p| p == "8080:8080"));
    let haproxy = file("deploy/haproxy.cfg");
    assert!(haproxy.contains("balance roundrobin"));
    for node in &nodes {
        assert!(haproxy.contains(&format!("server {node} {node}:8080")), "the proxy balances over {node}");
    }
    let directives = haproxy.lines().map(str::trim).filter(|l| !l.starts_with('#'));
    assert!(!directives.into_iter().any(|l| l.starts_with("cookie") || l.starts_with("stick")), "no stickiness");
}

#[test]
fn the_dockerfile_is_multi_stage_and_builds_as_the_readme_says() {
    let dockerfile = file("Dockerfile");
    assert_eq!(dockerfile.lines().filter(|l| l.starts_with("FROM ")).count(), 2, "two stages");
    let build = "cargo build --release --locked --bin kabao";
    assert!(dockerfile.contains(&format!("RUN {build}")));
    assert!(file("README.md").contains(build), "the README names the same build step");
    assert!(dockerfile.contains("COPY --from=build /src/target/release/kabao"));
}

/// Every file under `dir`, recursively, as text.
fn sources(dir: &Path, out: &mut String) {
    for entry in std::fs::read_dir(dir).expect("readable source dir") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs" || e == "lua") {
            out.push_str(&std::fs::read_to_string(&path).expect("source file"));
        }
    }
}

#[test]
fn the_grafana_dashboard_parses_and_charts_only_metrics_kabao_writes() {
    let dashboard: Value = serde_json::from_str(&file("deploy/grafana/kabao.json")).expect("dashboard is JSON");
    let mut src = String::new();
    sources(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"), &mut src);
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(panels.len() >= 10, "a panel per area of issue 9's list");
    let mut charted = 0;
    for panel in panels {
        for target in panel["targets"].as_array().expect("targets") {
            let expr = target["expr"].as_str().expect("expr");
            for (at, _) in expr.match_indices("kabao_") {
                let name: String = expr[at..]
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase() || *c == '_' || c.is_ascii_digit())
                    .collect();
                let written = name.strip_suffix("_bucket").unwrap_or(&name);
                assert!(
                    src.contains(&format!("\"{written}\"")),
                    "{} charts {written}, which kabao does not write",
                    panel["title"]
                );
                charted += 1;
            }
        }
    }
    assert!(charted > 0);
}
