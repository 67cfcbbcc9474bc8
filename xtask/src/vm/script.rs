//! The shell script each guest (and the host row) runs: the start-up checks of the release
//! binary (a stop once tracing, a stop during start-up, each a test line), then every test
//! binary of the kernel tiers.
use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
};

/// The script the guest (and the host row) runs, with the output directory as `$1`: the
/// kernel release, the release binary's start-up and summary lines (which programs it attached,
/// and what it warned about), then every test of the given targets.
pub(super) fn run_script(root: &Path, bins: &[(String, PathBuf)]) -> String {
    let tcpwait = root.join("target/release/tcpwait");
    let mut s = format!(
        r#"#!/bin/sh
OUT=$1
cd {root}
uname -r > $OUT/kernel
# stop NAME PID LOG SECONDS: SIGINT was sent to PID; a test line (cargo's format) says whether
# it exited 0 within SECONDS, with its summary in LOG; if not, its threads' kernel stacks.
stop() {{
  i=0
  while [ $i -lt $(($4 * 5)) ] && kill -0 $2 2>/dev/null; do sleep 0.2; i=$((i+1)); done
  if kill -0 $2 2>/dev/null; then
    echo "did not exit within $4 s of SIGINT" >> $3
    for t in /proc/$2/task/*; do
      echo "thread $t: $(cat $t/comm) $(cut -d' ' -f3 $t/stat) wchan=$(cat $t/wchan) syscall=$(cat $t/syscall)"
      cat $t/stack
    done > $OUT/hung-stacks 2>&1
    kill -KILL $2
  fi
  wait $2
  rc=$?
  echo "exit status $rc" >> $3
  if [ $rc = 0 ] && grep -q 'transitions seen' $3; then r=ok; else r=FAILED; fi
  echo "test $1 ... $r" >> $OUT/tests-startup.log
}}
# Start-up (debug lines time its phases), then SIGINT once it says it is tracing.
t0=$(cut -d' ' -f1 /proc/uptime)
TCPWAIT_LOG=tcpwait_agent=debug {tcpwait} trace > /dev/null 2> $OUT/startup.log &
pid=$!
i=0
while [ $i -lt 600 ] && ! grep -q '^tcpwait: ' $OUT/startup.log; do sleep 0.2; i=$((i+1)); done
echo "start-up: $t0 $(cut -d' ' -f1 /proc/uptime)" > $OUT/startup-time
kill -INT $pid
stop sigint_once_tracing $pid $OUT/startup.log 30
# SIGINT 1 s after exec: under emulation, in the middle of loading the programs. Background jobs
# of this shell start with SIGINT ignored, as under some supervisors.
{tcpwait} trace > /dev/null 2> $OUT/early-stop.log &
pid=$!
sleep 1
kill -INT $pid
stop sigint_during_start_up $pid $OUT/early-stop.log 150
"#,
        root = root.display(),
        tcpwait = tcpwait.display(),
    );
    for (name, bin) in bins {
        let _ = writeln!(
            s,
            "{} --include-ignored --test-threads=1 --show-output > $OUT/tests-{name}.log 2>&1",
            bin.display()
        );
    }
    s.push_str("echo finished > $OUT/finished\n");
    s
}
