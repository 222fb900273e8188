use super::*;

const DEFAULT: &str = "\
* nat
-N ISTIO_INBOUND
-N ISTIO_REDIRECT
-N ISTIO_IN_REDIRECT
-N ISTIO_OUTPUT
-A ISTIO_INBOUND -p tcp --dport 15008 -j RETURN
-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001
-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
-A PREROUTING -p tcp -j ISTIO_INBOUND
-A ISTIO_INBOUND -p tcp --dport 15090 -j RETURN
-A ISTIO_INBOUND -p tcp --dport 15021 -j RETURN
-A ISTIO_INBOUND -p tcp --dport 15020 -j RETURN
-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT
-A OUTPUT -p tcp -j ISTIO_OUTPUT
-A ISTIO_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN
-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --gid-owner 1337 -j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT -o lo -m owner ! --gid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -m owner --gid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN
-A ISTIO_OUTPUT -j ISTIO_REDIRECT
COMMIT
";

#[test]
fn defaults_match_istios_injected_init_container() {
    assert_eq!(rules(&CaptureConfig::default()).expect("valid"), DEFAULT);
}

/// The lines a configuration adds to or removes from the default rules.
fn diff(c: &CaptureConfig) -> (Vec<String>, Vec<String>) {
    let got = rules(c).expect("valid");
    let added = got
        .lines()
        .filter(|l| !DEFAULT.lines().any(|d| d == *l))
        .map(String::from)
        .collect();
    let removed = DEFAULT
        .lines()
        .filter(|d| !got.lines().any(|l| l == *d))
        .map(String::from)
        .collect();
    (added, removed)
}

#[test]
fn each_flag_changes_exactly_its_rules() {
    let base = CaptureConfig::default;
    let cases: Vec<(&str, CaptureConfig, Vec<&str>, Vec<&str>)> = vec![
        (
            "-i ranges",
            CaptureConfig {
                outbound_ip_ranges_include: "10.0.0.0/8,172.16.0.0/12,fd00::/8".into(),
                ..base()
            },
            vec![
                "-A ISTIO_OUTPUT -d 10.0.0.0/8 -j ISTIO_REDIRECT",
                "-A ISTIO_OUTPUT -d 172.16.0.0/12 -j ISTIO_REDIRECT",
            ],
            vec!["-A ISTIO_OUTPUT -j ISTIO_REDIRECT"],
        ),
        (
            "-x",
            CaptureConfig {
                outbound_ip_ranges_exclude: "169.254.169.254/32".into(),
                ..base()
            },
            vec!["-A ISTIO_OUTPUT -d 169.254.169.254/32 -j RETURN"],
            vec![],
        ),
        (
            "-b list",
            CaptureConfig {
                inbound_ports_include: "8080,9090".into(),
                ..base()
            },
            vec![
                "-A ISTIO_INBOUND -p tcp --dport 8080 -j ISTIO_IN_REDIRECT",
                "-A ISTIO_INBOUND -p tcp --dport 9090 -j ISTIO_IN_REDIRECT",
            ],
            vec![
                "-A ISTIO_INBOUND -p tcp --dport 15090 -j RETURN",
                "-A ISTIO_INBOUND -p tcp --dport 15021 -j RETURN",
                "-A ISTIO_INBOUND -p tcp --dport 15020 -j RETURN",
                "-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT",
            ],
        ),
        (
            "-b empty: no inbound capture",
            CaptureConfig {
                inbound_ports_include: String::new(),
                ..base()
            },
            vec![],
            vec![
                "-A PREROUTING -p tcp -j ISTIO_INBOUND",
                "-A ISTIO_INBOUND -p tcp --dport 15090 -j RETURN",
                "-A ISTIO_INBOUND -p tcp --dport 15021 -j RETURN",
                "-A ISTIO_INBOUND -p tcp --dport 15020 -j RETURN",
                "-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT",
            ],
        ),
        (
            "-d",
            CaptureConfig {
                inbound_ports_exclude: "15090,22".into(),
                ..base()
            },
            vec!["-A ISTIO_INBOUND -p tcp --dport 22 -j RETURN"],
            vec![
                "-A ISTIO_INBOUND -p tcp --dport 15021 -j RETURN",
                "-A ISTIO_INBOUND -p tcp --dport 15020 -j RETURN",
            ],
        ),
        (
            "-o",
            CaptureConfig {
                outbound_ports_exclude: "3306".into(),
                ..base()
            },
            vec!["-A ISTIO_OUTPUT -p tcp --dport 3306 -j RETURN"],
            vec![],
        ),
        (
            "-q",
            CaptureConfig {
                outbound_ports_include: "443".into(),
                ..base()
            },
            vec!["-A ISTIO_OUTPUT -p tcp --dport 443 -j ISTIO_REDIRECT"],
            vec![],
        ),
        (
            "-p -z",
            CaptureConfig {
                outbound_port: 16001,
                inbound_port: 16006,
                ..base()
            },
            vec![
                "-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 16001",
                "-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 16006",
            ],
            vec![
                "-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
                "-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006",
            ],
        ),
    ];
    for (name, config, added, removed) in cases {
        let (a, r) = diff(&config);
        assert_eq!(
            (a, r),
            (
                added.iter().map(|s| s.to_string()).collect(),
                removed.iter().map(|s| s.to_string()).collect()
            ),
            "{name}"
        );
    }
}

#[test]
fn outbound_port_exclusions_come_before_the_loopback_rules() {
    let got = rules(&CaptureConfig {
        outbound_ports_exclude: "3306".into(),
        ..Default::default()
    })
    .expect("valid");
    let at = |needle: &str| got.find(needle).expect(needle);
    assert!(at("--dport 3306 -j RETURN") < at("-s 127.0.0.6/32"));
}

#[test]
fn annotations_map_to_their_flags() {
    let annotations: BTreeMap<String, String> = [
        (
            "traffic.sidecar.istio.io/includeOutboundIPRanges",
            "10.0.0.0/8",
        ),
        ("traffic.sidecar.istio.io/excludeInboundPorts", "9999"),
        ("traffic.sidecar.istio.io/excludeOutboundPorts", "5432"),
        ("traffic.sidecar.istio.io/includeOutboundPorts", "443"),
        (
            "traffic.sidecar.istio.io/excludeOutboundIPRanges",
            "10.1.0.0/16",
        ),
        ("traffic.sidecar.istio.io/includeInboundPorts", "*"),
        ("unrelated.example.com/x", "y"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let c = CaptureConfig::default().with_annotations(&annotations);
    assert_eq!(
        (
            c.outbound_ip_ranges_include.as_str(),
            c.outbound_ip_ranges_exclude.as_str(),
            c.inbound_ports_exclude.as_str()
        ),
        ("10.0.0.0/8", "10.1.0.0/16", "15090,15021,15020,9999")
    );
    assert_eq!(
        (
            c.outbound_ports_exclude.as_str(),
            c.outbound_ports_include.as_str(),
            c.inbound_ports_include.as_str()
        ),
        ("5432", "443", "*")
    );
}

#[test]
fn bad_values_are_refused_with_the_flag_named() {
    for (c, flag) in [
        (
            CaptureConfig {
                inbound_ports_exclude: "http".into(),
                ..Default::default()
            },
            "-d",
        ),
        (
            CaptureConfig {
                outbound_ip_ranges_exclude: "10.0.0.0/40".into(),
                ..Default::default()
            },
            "-x",
        ),
        (
            CaptureConfig {
                outbound_ports_include: "70000".into(),
                ..Default::default()
            },
            "-q",
        ),
    ] {
        let err = rules(&c).expect_err("invalid").to_string();
        assert!(err.starts_with(flag), "{err}");
    }
    assert_eq!(
        rules(&CaptureConfig {
            mode: "TPROXY".into(),
            ..Default::default()
        }),
        Err(CaptureError::Mode("TPROXY".into()))
    );
}

#[test]
fn cleanup_removes_jumps_before_chains() {
    let cmds = cleanup_commands();
    assert_eq!(
        cmds[0],
        ["-D", "PREROUTING", "-p", "tcp", "-j", "ISTIO_INBOUND"]
    );
    assert_eq!(
        cmds.last().map(|c| c.join(" ")).as_deref(),
        Some("-X ISTIO_IN_REDIRECT")
    );
}

/// The injector writes `istio-init`'s arguments with `args()`; they must mean the same settings here.
#[test]
fn the_injectors_arguments_parse_back_into_the_same_settings() {
    use clap::Parser;
    #[derive(Debug, Parser)]
    struct Cli {
        #[command(subcommand)]
        command: Command,
    }
    #[derive(Debug, clap::Subcommand)]
    enum Command {
        Iptables {
            #[command(flatten)]
            capture: CaptureConfig,
        },
    }
    let annotations: BTreeMap<String, String> = [
        ("traffic.sidecar.istio.io/excludeOutboundPorts", "3306,6379"),
        ("traffic.sidecar.istio.io/includeInboundPorts", ""),
        (
            "traffic.sidecar.istio.io/excludeOutboundIPRanges",
            "10.0.0.0/8",
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    for capture in [
        CaptureConfig::default(),
        CaptureConfig::default().with_annotations(&annotations),
    ] {
        let argv = std::iter::once("weft-proxy".to_string()).chain(capture.args());
        let Command::Iptables { capture: parsed } =
            Cli::try_parse_from(argv).expect("parses").command;
        assert_eq!(parsed, capture);
    }
}
