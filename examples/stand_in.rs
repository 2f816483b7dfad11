//! A stand-in provider node as a program: the testkit's [`StandInNode`]
//! (OpenAI chat completions, plain and streamed, and embeddings), served on
//! loopback until Ctrl-C or SIGTERM. `scripts/bench.sh` measures it directly,
//! behind nginx and behind the host.
//!
//! ```text
//! cargo run --release --example stand_in
//! ```
//!
//! It listens on a free loopback port (the stand-in picks its own) and prints
//! one line on stdout, `listening on http://127.0.0.1:PORT`, for a script to
//! read. Every chat answer reports 10 prompt and 5 completion tokens; a
//! streamed one sends five content chunks, split across writes at odd places
//! as real servers do.

use clap::Parser;
use cxmpute::core::http::shutdown_signal;
use cxmpute::core::testkit::StandInNode;

#[derive(Debug, Parser)]
#[command(about = "Serves a stand-in provider node on loopback")]
struct Args {
    /// The name it answers with ("Hello from NAME").
    #[arg(long, default_value = "stand-in")]
    name: String,
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let node = StandInNode::start(&args.name).await;
    // Rust's stdout is line-buffered, so a script reading a pipe or a file
    // sees this line at once.
    println!("listening on {}", node.url());
    shutdown_signal().await;
}
