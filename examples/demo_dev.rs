//! Runs `raft-elector demo` before `main.rs` wires it: the same flags, with
//! nodes started from the `raft-elector` binary next to this example.
//!
//! ```text
//! cargo build --bin raft-elector && cargo run --example demo_dev -- --nodes 3
//! ```

use clap::Parser;
use raft_elector::cli::DemoArgs;

/// Flags of `raft-elector demo`.
#[derive(Parser)]
struct Flags {
    #[command(flatten)]
    demo: DemoArgs,
}

fn main() -> anyhow::Result<()> {
    let config = Flags::parse().demo.validate()?;
    // target/<profile>/examples/demo_dev -> target/<profile>/raft-elector
    let exe = std::env::current_exe()?
        .parent()
        .and_then(|examples| examples.parent())
        .map(|profile| profile.join("raft-elector"))
        .ok_or_else(|| anyhow::anyhow!("cannot locate the raft-elector binary"))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(raft_elector::demo::run_demo_with_binary(config, &exe))
}
