//! The container images: what the Dockerfile's final stages hold, built here without a container
//! engine. For each final stage, the test lays out the same file tree from the workspace's
//! binaries (`COPY --from=build /out/X /usr/local/bin/X`), checks with `ldd` that every binary
//! needs only libraries the runtime base (distroless cc: glibc, libgcc_s) has, and runs each one
//! (`--version`, `--help`) from that tree with an empty environment. It also checks that the
//! Helm chart and the `k8s/` manifests name exactly the images the Dockerfile builds.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// What gcr.io/distroless/cc-debian12 provides (glibc, libgcc_s, libstdc++) and the kernel's vDSO.
const BASE_LIBRARIES: [&str; 9] = [
    "linux-vdso.so.1",
    "ld-linux-x86-64.so.2",
    "ld-linux-aarch64.so.1",
    "libc.so.6",
    "libm.so.6",
    "libgcc_s.so.1",
    "libdl.so.2",
    "libpthread.so.0",
    "librt.so.1",
];

struct Stage {
    name: String,
    title: String,
    version: String,
    entrypoint: String,
    user: String,
    /// (source in the build stage, destination in the image)
    copies: Vec<(String, String)>,
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// The final stages of the Dockerfile (those built FROM the runtime image), parsed line by line
/// (with `\` continuations joined).
fn final_stages() -> Vec<Stage> {
    let text = std::fs::read_to_string(root().join("Dockerfile")).unwrap();
    let joined = text.replace("\\\n", " ");
    let mut stages: Vec<Stage> = Vec::new();
    for line in joined.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("FROM ") {
            let words: Vec<&str> = rest.split_whitespace().collect();
            if words[0] == "${RUNTIME_IMAGE}" {
                assert_eq!(words.get(1), Some(&"AS"), "{line}");
                stages.push(Stage {
                    name: words[2].to_string(),
                    title: String::new(),
                    version: String::new(),
                    entrypoint: String::new(),
                    user: String::new(),
                    copies: Vec::new(),
                });
            } else {
                // The build stage: the Rust image, pinned to an exact version.
                assert!(words[0].contains("rust:${RUST_VERSION}"), "{line}");
            }
            continue;
        }
        let Some(stage) = stages.last_mut() else {
            continue;
        };
        if let Some(rest) = line.strip_prefix("COPY --from=build ") {
            let words: Vec<&str> = rest.split_whitespace().collect();
            stage.copies.push((words[0].to_string(), words[1].to_string()));
        } else if let Some(rest) = line.strip_prefix("LABEL ") {
            for part in rest.split("org.opencontainers.image.").skip(1) {
                let (key, value) = part.split_once('=').unwrap();
                let value = value.trim().split('"').nth(1).unwrap_or_default().to_string();
                match key {
                    "title" => stage.title = value,
                    "version" => stage.version = value,
                    _ => {}
                }
            }
        } else if let Some(rest) = line.strip_prefix("ENTRYPOINT ") {
            stage.entrypoint = rest.trim_matches(['[', ']', '"']).to_string();
        } else if let Some(rest) = line.strip_prefix("USER ") {
            stage.user = rest.to_string();
        }
    }
    stages
}

fn arg_default(name: &str) -> String {
    let text = std::fs::read_to_string(root().join("Dockerfile")).unwrap();
    let prefix = format!("ARG {name}=");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no ARG {name}= in the Dockerfile"))
        .to_string()
}

#[test]
fn the_dockerfile_builds_pinned_and_runs_as_non_root() {
    let rust = arg_default("RUST_VERSION");
    assert_eq!(
        rust.split('.').count(),
        3,
        "the Rust image is pinned to an exact version: {rust}"
    );
    let runtime = arg_default("RUNTIME_IMAGE");
    assert!(
        runtime.starts_with("gcr.io/distroless/cc-") && runtime.ends_with(":nonroot"),
        "{runtime}"
    );
    let stages = final_stages();
    assert_eq!(
        stages.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
        ["control-plane", "data-plane"]
    );
    for s in &stages {
        // The chart's securityContext runs as 65532 (distroless's nonroot user).
        assert_eq!(s.user, "65532:65532", "{}", s.name);
        assert_eq!(s.title, format!("relay-{}", s.name));
        assert_eq!(s.version, "${VERSION}");
        assert_eq!(s.entrypoint, format!("/usr/local/bin/relay-{}", s.name));
    }
    let ignore = std::fs::read_to_string(root().join(".dockerignore")).unwrap();
    assert!(
        ignore.lines().any(|l| l == "target/"),
        "the build context leaves target/ out"
    );
    assert!(ignore.lines().any(|l| l == ".git/"));
    // What the scripts keep in the clone (scripts/standalone.sh: relay-data, scripts/fleet.sh:
    // .fleet) holds master keys, tokens and a Postgres data directory only its owner can read:
    // never sent to a build, never committed.
    let git_ignore = std::fs::read_to_string(root().join(".gitignore")).unwrap();
    for state in ["relay-data", ".fleet"] {
        assert!(
            ignore.lines().any(|l| l == format!("{state}/")),
            ".dockerignore does not leave {state}/ out of the build context"
        );
        assert!(
            git_ignore.lines().any(|l| l == format!("/{state}")),
            ".gitignore does not ignore /{state}"
        );
    }
}

/// The build stage has the tools the locked dependencies' build scripts run beyond the C compiler
/// the slim Rust image ships (ca-certificates, gcc, libc6-dev, wget: docker-library's slim
/// Dockerfile), and a Rust no older than the workspace's `rust-version`.
#[test]
fn the_build_stage_has_what_the_build_scripts_run() {
    let text = std::fs::read_to_string(root().join("Dockerfile")).unwrap();
    let build: String = text
        .lines()
        .skip_while(|l| !(l.starts_with("FROM ") && l.ends_with(" AS build")))
        .skip(1)
        .take_while(|l| !l.starts_with("FROM "))
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        text.contains("rust:${RUST_VERSION}-slim-"),
        "the build stage is the slim Rust image"
    );
    let installed: Vec<&str> = build
        .split("apt-get install")
        .skip(1)
        .flat_map(|rest| rest.split("&&").next().unwrap_or("").split_whitespace())
        .filter(|w| !w.starts_with('-') && *w != "\\")
        .collect();
    let lock = std::fs::read_to_string(root().join("Cargo.lock")).unwrap();
    // crate whose build script runs it -> the Debian package
    for (krate, tool) in [
        ("tikv-jemalloc-sys", "make"),
        ("cmake", "cmake"),
        ("openssl-sys", "libssl-dev"),
    ] {
        if lock.contains(&format!("name = \"{krate}\"")) {
            assert!(
                installed.contains(&tool),
                "Cargo.lock has {krate}, whose build runs {tool}: the build stage installs {installed:?}"
            );
        }
    }
    let minor = |v: &str| -> (u32, u32) {
        let mut parts = v.split('.').map(|p| p.parse::<u32>().unwrap());
        (parts.next().unwrap(), parts.next().unwrap_or(0))
    };
    let manifest = std::fs::read_to_string(root().join("Cargo.toml")).unwrap();
    let msrv = manifest
        .lines()
        .find_map(|l| l.strip_prefix("rust-version = "))
        .unwrap()
        .trim_matches('"');
    assert!(
        minor(&arg_default("RUST_VERSION")) >= minor(msrv),
        "the Dockerfile's Rust is older than rust-version {msrv}"
    );
}

/// The chart and the plain manifests name exactly the images the Dockerfile builds, at the
/// chart's appVersion (which the Dockerfile's VERSION defaults to).
#[test]
fn the_chart_and_manifests_name_the_images_the_dockerfile_builds() {
    let stages = final_stages();
    let titles: Vec<&str> = stages.iter().map(|s| s.title.as_str()).collect();
    let chart = std::fs::read_to_string(root().join("helm/relay/Chart.yaml")).unwrap();
    let app_version = chart
        .lines()
        .find_map(|l| l.strip_prefix("appVersion:"))
        .unwrap()
        .trim()
        .trim_matches('"')
        .to_string();
    assert_eq!(
        arg_default("VERSION"),
        app_version,
        "the Dockerfile's VERSION is the chart's appVersion"
    );
    let values = std::fs::read_to_string(root().join("helm/relay/values.yaml")).unwrap();
    let repos: Vec<&str> = values
        .lines()
        .filter_map(|l| l.trim().strip_prefix("repository:"))
        .map(str::trim)
        .collect();
    assert_eq!(repos, titles, "values.yaml image repositories");
    let mut images = Vec::new();
    for entry in std::fs::read_dir(root().join("k8s")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let text = std::fs::read_to_string(&path).unwrap();
            for l in text.lines() {
                if let Some(image) = l.trim().strip_prefix("image:") {
                    images.push(image.trim().to_string());
                }
            }
        }
    }
    images.sort();
    let expected: Vec<String> = titles.iter().map(|t| format!("{t}:{app_version}")).collect();
    assert_eq!(images, expected, "images in k8s/*.yaml");
}

fn libraries(binary: &Path) -> Vec<String> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .unwrap_or_else(|e| panic!("cannot run ldd ({e})"));
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    if text.contains("statically linked") || text.contains("not a dynamic executable") {
        return Vec::new();
    }
    assert!(out.status.success(), "ldd {}: {text}", binary.display());
    text.lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(|lib| lib.rsplit('/').next().unwrap_or(lib).to_string())
        .collect()
}

/// Lay out each final stage's file tree from the workspace's binaries (the debug build: the same
/// code and linkage as the release build the Dockerfile makes) and run what it holds.
#[test]
fn each_image_holds_binaries_that_need_only_the_base_image_and_run() {
    let stages = final_stages();
    let tmp = tempfile::tempdir().unwrap();
    for stage in &stages {
        let rootfs = tmp.path().join(&stage.name);
        assert!(!stage.copies.is_empty(), "{} copies nothing", stage.name);
        for (from, to) in &stage.copies {
            let name = from.strip_prefix("/out/").unwrap();
            let src = relay_test_support::workspace_bin(name);
            assert!(src.exists(), "{} is not built", src.display());
            let dest = rootfs.join(to.trim_start_matches('/'));
            std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
            std::fs::copy(&src, &dest).unwrap();
            for lib in libraries(&dest) {
                assert!(
                    BASE_LIBRARIES.contains(&lib.as_str()),
                    "{to} in the {} image needs {lib}, which the runtime base does not have",
                    stage.name
                );
            }
        }
        // The file tree is read-only, the environment empty and the working directory `/`, as
        // in the container with readOnlyRootFilesystem.
        for (_, to) in &stage.copies {
            let bin = rootfs.join(to.trim_start_matches('/'));
            let mut perms = std::fs::metadata(&bin).unwrap().permissions();
            perms.set_readonly(true);
            std::fs::set_permissions(&bin, perms).unwrap();
            for arg in ["--version", "--help"] {
                let out = Command::new(&bin)
                    .arg(arg)
                    .env_clear()
                    .current_dir("/")
                    .output()
                    .unwrap();
                let text = String::from_utf8_lossy(&out.stdout);
                assert!(
                    out.status.success(),
                    "{to} {arg}: {text}{}",
                    String::from_utf8_lossy(&out.stderr)
                );
                let name = to.rsplit('/').next().unwrap();
                if arg == "--version" {
                    assert!(text.starts_with(name), "{to} --version: {text}");
                    assert!(text.contains(env!("CARGO_PKG_VERSION")), "{to} --version: {text}");
                } else {
                    assert!(text.contains("Usage:"), "{to} --help: {text}");
                }
            }
        }
        let entry = rootfs.join(stage.entrypoint.trim_start_matches('/'));
        assert!(entry.exists(), "the {} entrypoint is not in the image", stage.name);
    }
}
