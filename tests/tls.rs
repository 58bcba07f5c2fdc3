//! Mutual TLS on the control plane between real processes: a worker with a certificate from
//! the cluster's CA serves a coordinator with one too; a coordinator without TLS, or with a
//! certificate from another CA, is refused; two workers exchange activations over gRPC with
//! TLS. Certificates are made with the `openssl` command.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::server::Worker;
use common::*;

fn openssl(dir: &Path, args: &[&str]) {
    let output = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl runs");
    assert!(
        output.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A CA `name` (name.key, name.crt) and, signed by it, a certificate `leaf` for 127.0.0.1.
fn make_pki(dir: &Path, name: &str, leaves: &[&str]) {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let ca_key = format!("{name}.key");
    let ca_crt = format!("{name}.crt");
    let mut args = vec!["req", "-x509"];
    args.extend(ec);
    args.extend(["-keyout", &ca_key, "-out", &ca_crt, "-days", "2"]);
    let subject = format!("/CN={name}");
    args.extend(["-subj", &subject]);
    openssl(dir, &args);
    std::fs::write(dir.join("san.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    for leaf in leaves {
        let (key, csr, crt) = (
            format!("{leaf}.key"),
            format!("{leaf}.csr"),
            format!("{leaf}.crt"),
        );
        let mut args = vec!["req"];
        args.extend(ec);
        let subject = format!("/CN={leaf}");
        args.extend(["-keyout", &key, "-out", &csr, "-subj", &subject]);
        openssl(dir, &args);
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                &ca_crt,
                "-CAkey",
                &ca_key,
                "-CAcreateserial",
                "-out",
                &crt,
                "-days",
                "2",
                "-extfile",
                "san.ext",
            ],
        );
    }
}

fn generate(model: &Path, hosts: &Path) -> Output {
    Command::new(coordinator_binary())
        .arg("generate")
        .arg("--model")
        .arg(model)
        .arg("--workers")
        .arg(hosts)
        .args(["-p", "Hello", "-n", "4", "--temperature", "0"])
        .output()
        .unwrap()
}

#[test]
fn mutual_tls_on_the_control_plane() {
    let Some(model) = model(SMOLLM2) else { return };
    if Command::new("openssl").arg("version").output().is_err() {
        if std::env::var_os("CI").is_some() {
            panic!("the openssl command is missing (Debian package openssl)");
        }
        eprintln!("skipping: the openssl command is missing");
        return;
    }
    let dir = std::env::temp_dir().join(format!("tp-tls-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    make_pki(&dir, "ca", &["worker", "coordinator"]);
    make_pki(&dir, "rogue", &["intruder"]);
    let token = dir.join("token");
    std::fs::write(&token, "tls-test-token-0123456789\n").unwrap();

    let start = |name: &str| -> Worker {
        let log = dir.join(format!("{name}.log"));
        let (child, address) = common::server::spawn_listening(
            Command::new(worker_binary())
                .args(["--listen", "127.0.0.1:0", "--threads", "1", "--log", "info"])
                .arg("--auth-token-file")
                .arg(&token)
                .arg("--tls-cert")
                .arg(dir.join("worker.crt"))
                .arg("--tls-key")
                .arg(dir.join("worker.key"))
                .arg("--tls-ca")
                .arg(dir.join("ca.crt"))
                .stderr(std::fs::File::create(&log).unwrap()),
        );
        Worker {
            child,
            address,
            log,
        }
    };
    let workers = [start("w0"), start("w1")];
    let address = workers[0].address.clone();

    let hosts = |name: &str, tls: Option<(&str, &str)>| {
        let mut text = String::from("auth_token_file = \"token\"\n");
        if let Some((leaf, ca)) = tls {
            text += &format!(
                "tls_cert = \"{leaf}.crt\"\ntls_key = \"{leaf}.key\"\ntls_ca = \"{ca}.crt\"\n"
            );
        }
        text += &format!("[[worker]]\naddress = \"{address}\"\nthreads = 1\n");
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let text = |o: &Output| {
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    };

    let ok = generate(&model, &hosts("tls.toml", Some(("coordinator", "ca"))));
    assert!(ok.status.success(), "{}", text(&ok));
    assert!(!String::from_utf8_lossy(&ok.stdout).trim().is_empty());

    let plain = generate(&model, &hosts("plain.toml", None));
    assert!(
        !plain.status.success(),
        "a plain-text coordinator was served"
    );
    assert!(text(&plain).contains(&address), "{}", text(&plain));
    eprintln!("plain text: {}", text(&plain).trim());

    // A certificate from another CA: the worker refuses the handshake.
    let rogue = generate(&model, &hosts("rogue.toml", Some(("intruder", "ca"))));
    assert!(
        !rogue.status.success(),
        "a coordinator with a foreign certificate was served"
    );
    eprintln!("foreign client certificate: {}", text(&rogue).trim());
    // And a coordinator that does not trust the worker's CA refuses the worker.
    let distrust = generate(&model, &hosts("distrust.toml", Some(("intruder", "rogue"))));
    assert!(
        !distrust.status.success(),
        "a worker with a foreign certificate was trusted"
    );
    eprintln!("untrusted worker: {}", text(&distrust).trim());

    // Two workers exchanging activations over gRPC: the data plane is mutual TLS too.
    let both = dir.join("grpc.toml");
    std::fs::write(
        &both,
        format!(
            "auth_token_file = \"token\"\ntransport = \"grpc\"\ntls_cert = \"coordinator.crt\"\ntls_key = \"coordinator.key\"\ntls_ca = \"ca.crt\"\n[[worker]]\naddress = \"{}\"\nthreads = 1\n[[worker]]\naddress = \"{}\"\nthreads = 1\n",
            workers[0].address, workers[1].address
        ),
    )
    .unwrap();
    let grpc = generate(&model, &both);
    assert!(grpc.status.success(), "{}", text(&grpc));
    let log = std::fs::read_to_string(&workers[1].log).unwrap();
    assert!(log.contains("data plane connected"), "{log}");

    // Half a TLS configuration is an error that says what is missing.
    let half = Command::new(worker_binary())
        .arg("--tls-cert")
        .arg(dir.join("worker.crt"))
        .output()
        .unwrap();
    assert!(!half.status.success());
    assert!(text(&half).contains("--tls-key"), "{}", text(&half));
    let _ = std::fs::remove_dir_all(&dir);
}
