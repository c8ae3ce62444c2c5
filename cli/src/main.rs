//! `meshwasm`: check filter configurations, convert Istio resources, build and push Wasm OCI
//! images, generate WasmPlugin manifests. `meshwasm help` for usage.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use meshwasm_cli::{filters, istio, oci, schema, wasmplugin};
use serde_json::Value;

const USAGE: &str = "\
usage: meshwasm <command> [options]

commands:
  check <filter> <config.json> [--route]
        check a plugin configuration (or, with --route, a per-route override) with the
        filter's own parser, as Envoy would; exit status 0 (accepted) or 1 (refused)
  oci build <module.wasm> [--variant compat|artifact] [--root-id ID] [--output DIR] [--tag T]
        build the module's image (reproducibly) and print its digests; --output writes it
        as an OCI image layout (for skopeo copy oci:DIR …)
  oci push <module.wasm> <registry/repository:tag> [--variant compat|artifact] [--root-id ID]
        [--plain-http]
        build and push; prints the manifest digest (WasmPlugin sha256 for oci://) and the
        module's sha256 (for http(s):// URLs and Envoy vm_config.code.remote)
  wasmplugin <filter> --image <registry/repository:tag> [--sha256 HEX | --module FILE]
        [--variant V] [--config FILE] [--name N] [--namespace NS] [--selector k=v]...
        print an Istio WasmPlugin manifest: sha256 is the manifest digest of the image built
        from --module (default dist/<filter>.wasm), or --sha256 as `oci push` printed it
  from-istio <file.yaml>... [--yaml]
        VirtualService fault/retries/timeout, AuthorizationPolicy, RequestAuthentication,
        Telemetry, WasmPlugin →
        each filter's plugin JSON and per-route metadata; unsupported fields are listed
        (exit status 2 when there are any, 1 on errors)
  validate [--crds crd-all.gen.yaml] <file.yaml>...
        every Istio resource against its CRD's OpenAPI v3 schema ($MESHWASM_ISTIO_CRDS by
        default); a WasmPlugin's pluginConfig also through its filter's parser

filters: FILTERS
variants: compat (default: OCI image, one tar+gzip layer with plugin.wasm) or artifact
          (Wasm artifact media types, as WebAssembly Hub's wasme pushes)
credentials: MESHWASM_REGISTRY_USERNAME/MESHWASM_REGISTRY_PASSWORD, else ~/.docker/config.json
             ($DOCKER_CONFIG), else anonymous";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = USAGE.replace("FILTERS", &filters::FILTERS.iter().map(|f| f.name).collect::<Vec<_>>().join(", "));
    let rest = args.get(1..).unwrap_or_default();
    let result = match args.first().map(String::as_str) {
        Some("check") => check(rest),
        Some("oci") => oci_cmd(rest),
        Some("wasmplugin") => wasmplugin_cmd(rest),
        Some("from-istio") => from_istio(rest),
        Some("validate") => validate(rest),
        None | Some("help" | "-h" | "--help") => {
            println!("{usage}");
            Ok(ExitCode::SUCCESS)
        }
        Some(other) => Err(format!("unknown command `{other}`\n\n{usage}")),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("meshwasm: {e}");
            ExitCode::FAILURE
        }
    }
}

// === argument parsing ===

/// Positional arguments, `--flag value` options and `--switch`es.
struct Args {
    positional: Vec<String>,
    options: Vec<(String, String)>,
    switches: Vec<String>,
}

impl Args {
    fn parse(args: &[String], options: &[&str], switches: &[&str]) -> Result<Self, String> {
        let mut out = Args { positional: Vec::new(), options: Vec::new(), switches: Vec::new() };
        let mut it = args.iter();
        while let Some(a) = it.next() {
            if let Some(name) = a.strip_prefix("--") {
                if switches.contains(&name) {
                    out.switches.push(name.to_string());
                } else if options.contains(&name) {
                    let v = it.next().ok_or_else(|| format!("--{name} needs a value"))?;
                    out.options.push((name.to_string(), v.clone()));
                } else {
                    return Err(format!("unknown option `{a}` (meshwasm help)"));
                }
            } else {
                out.positional.push(a.clone());
            }
        }
        Ok(out)
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.options.iter().rev().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    fn all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.options.iter().filter(move |(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    fn has(&self, name: &str) -> bool {
        self.switches.iter().any(|s| s == name)
    }

    fn exactly<const N: usize>(&self, what: &str) -> Result<[&str; N], String> {
        let v: Vec<&str> = self.positional.iter().map(String::as_str).collect();
        v.try_into().map_err(|_| format!("expected {what} (meshwasm help)"))
    }
}

fn read(path: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{path}: {e}"))
}

/// A JSON or YAML file as a JSON value.
fn read_config(path: &str) -> Result<Value, String> {
    let bytes = read(path)?;
    serde_json::from_slice(&bytes)
        .or_else(|_| serde_yaml_ng::from_slice(&bytes).map_err(|e| format!("{path}: neither JSON nor YAML: {e}")))
}

// === check ===

fn check(args: &[String]) -> Result<ExitCode, String> {
    let a = Args::parse(args, &[], &["route"])?;
    let [filter, file] = a.exactly::<2>("<filter> <config.json>")?;
    let spec = filters::find(filter)?;
    let bytes = read(file)?;
    let result = if a.has("route") {
        let check = spec.check_route.ok_or_else(|| format!("the {filter} filter takes no per-route override"))?;
        serde_json::from_slice::<Value>(&bytes)
            .map_err(|e| format!("not JSON: {e}"))
            .and_then(|v| check(&v).map_err(|e| e.to_string()))
    } else {
        (spec.check)(&bytes).map_err(|e| e.to_string())
    };
    match result {
        Ok(()) => {
            println!("{file}: OK ({filter}{})", if a.has("route") { " per-route override" } else { "" });
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("{file}: {e}");
            Ok(ExitCode::FAILURE)
        }
    }
}

// === oci ===

fn root_id(module: &str, a: &Args) -> String {
    a.get("root-id").map(str::to_string).unwrap_or_else(|| {
        let stem = Path::new(module).file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        format!("meshwasm.{stem}")
    })
}

fn oci_cmd(args: &[String]) -> Result<ExitCode, String> {
    let Some((sub, rest)) = args.split_first() else {
        return Err("expected `oci build` or `oci push` (meshwasm help)".into());
    };
    let a = Args::parse(rest, &["variant", "root-id", "output", "tag"], &["plain-http"])?;
    let variant = oci::Variant::parse(a.get("variant").unwrap_or("compat"))?;
    match sub.as_str() {
        "build" => {
            let [module] = a.exactly::<1>("<module.wasm>")?;
            let image = oci::build(&read(module)?, variant, &root_id(module, &a))?;
            if let Some(dir) = a.get("output") {
                oci::write_layout(&image, Path::new(dir), a.get("tag").unwrap_or("latest"))?;
                println!(
                    "image layout     {dir} (skopeo copy oci:{dir}:{} docker://…)",
                    a.get("tag").unwrap_or("latest")
                );
            }
            print!("{}", oci::describe(&image, None, None));
            Ok(ExitCode::SUCCESS)
        }
        "push" => {
            let [module, reference] = a.exactly::<2>("<module.wasm> <registry/repository:tag>")?;
            let image = oci::build(&read(module)?, variant, &root_id(module, &a))?;
            let opts = oci::PushOptions { plain_http: a.has("plain-http") };
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| format!("starting the async runtime: {e}"))?;
            let pushed = rt.block_on(oci::push(&image, reference, &opts))?;
            println!("pushed           {}", pushed.reference);
            print!("{}", oci::describe(&image, Some(&pushed.reference), pushed.module_blob_url.as_deref()));
            Ok(ExitCode::SUCCESS)
        }
        other => Err(format!("unknown `oci {other}`: build or push")),
    }
}

// === wasmplugin ===

fn wasmplugin_cmd(args: &[String]) -> Result<ExitCode, String> {
    let a = Args::parse(
        args,
        &["image", "sha256", "module", "variant", "config", "name", "namespace", "selector", "root-id"],
        &[],
    )?;
    let [filter] = a.exactly::<1>("<filter>")?;
    let spec = filters::find(filter)?;
    let image = a.get("image").ok_or("--image <registry/repository:tag> is required")?;
    let image = image.strip_prefix("oci://").unwrap_or(image);
    let sha256 = match a.get("sha256") {
        Some(s) => s.trim_start_matches("sha256:").to_string(),
        None => {
            let module =
                a.get("module").map(PathBuf::from).unwrap_or_else(|| Path::new("dist").join(format!("{filter}.wasm")));
            let module = module.to_string_lossy().into_owned();
            let variant = oci::Variant::parse(a.get("variant").unwrap_or("compat"))?;
            let built = oci::build(&read(&module)?, variant, &root_id(&module, &a))?;
            built.manifest_hex().to_string()
        }
    };
    let config = match a.get("config") {
        Some(path) => read_config(path)?,
        None => Value::Object(Default::default()),
    };
    let selector: Vec<(String, String)> = a
        .all("selector")
        .map(|s| {
            s.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .ok_or(format!("--selector {s}: want key=value"))
        })
        .collect::<Result<_, _>>()?;
    let generated_by =
        std::iter::once("meshwasm wasmplugin".to_string()).chain(args.iter().cloned()).collect::<Vec<_>>().join(" ");
    let yaml = wasmplugin::render(&wasmplugin::Options {
        filter: spec,
        image,
        sha256: &sha256,
        config: &config,
        name: a.get("name"),
        namespace: a.get("namespace"),
        selector: &selector,
        generated_by: &generated_by,
    })?;
    print!("{yaml}");
    Ok(ExitCode::SUCCESS)
}

// === from-istio ===

fn read_resources(files: &[String]) -> Result<Vec<istio::Resource>, String> {
    let mut out = Vec::new();
    for file in files {
        let text = String::from_utf8(read(file)?).map_err(|_| format!("{file}: not UTF-8"))?;
        for value in schema::yaml_documents(&text).map_err(|e| format!("{file}: {e}"))? {
            out.push(istio::Resource { file: file.clone(), value });
        }
    }
    Ok(out)
}

fn from_istio(args: &[String]) -> Result<ExitCode, String> {
    let a = Args::parse(args, &[], &["yaml"])?;
    if a.positional.is_empty() {
        return Err("expected <file.yaml>... (meshwasm help)".into());
    }
    let out = istio::convert(&read_resources(&a.positional)?);
    let doc = out.to_json();
    if a.has("yaml") {
        print!("{}", serde_yaml_ng::to_string(&doc).map_err(|e| e.to_string())?);
    } else {
        println!("{}", serde_json::to_string_pretty(&doc).map_err(|e| e.to_string())?);
    }
    for u in &out.unsupported {
        eprintln!("unsupported: {u}");
    }
    for e in &out.errors {
        eprintln!("error: {e}");
    }
    Ok(if !out.errors.is_empty() {
        ExitCode::FAILURE
    } else if !out.unsupported.is_empty() {
        ExitCode::from(2)
    } else {
        ExitCode::SUCCESS
    })
}

// === validate ===

fn validate(args: &[String]) -> Result<ExitCode, String> {
    let a = Args::parse(args, &["crds"], &[])?;
    let crds_path = a
        .get("crds")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("MESHWASM_ISTIO_CRDS").map(PathBuf::from))
        .ok_or("--crds <crd-all.gen.yaml> (or MESHWASM_ISTIO_CRDS) is required")?;
    let crds = schema::Crds::load(&crds_path)?;
    if a.positional.is_empty() {
        return Err("expected <file.yaml>... (meshwasm help)".into());
    }
    let mut failed = 0;
    let mut checked = 0;
    for r in read_resources(&a.positional)? {
        let Some(report) = crds.validate(&r.value) else {
            println!("skip  {} (not an Istio resource)", r.id());
            continue;
        };
        checked += 1;
        let mut errors = report.errors;
        if r.value.get("kind").and_then(Value::as_str) == Some("WasmPlugin") {
            let url = r.value.pointer("/spec/url").and_then(Value::as_str).unwrap_or_default();
            let name = r.value.pointer("/metadata/name").and_then(Value::as_str).unwrap_or_default();
            if let Some(filter) = istio::wasmplugin_filter(url, name) {
                let config =
                    r.value.pointer("/spec/pluginConfig").cloned().unwrap_or(Value::Object(Default::default()));
                if let Err(e) = filters::check(&filter, config.to_string().as_bytes()) {
                    errors.push(format!("/spec/pluginConfig: refused by the {filter} filter: {e}"));
                }
            }
        }
        let cel = if report.cel_rules_unchecked > 0 {
            format!(" ({} CEL rules not evaluated)", report.cel_rules_unchecked)
        } else {
            String::new()
        };
        if errors.is_empty() {
            println!("OK    {}{cel}", r.id());
        } else {
            failed += 1;
            println!("FAIL  {}", r.id());
            for e in errors {
                println!("      {e}");
            }
        }
    }
    println!("{checked} Istio resource(s) checked against {}, {failed} invalid", crds_path.display());
    Ok(if failed == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}
