#!/usr/bin/env bash
# Five runs in a row of `bash .ci/run` on a clean clone of this checkout's HEAD, with a CPU hog
# (one core busy) beside it the whole time; each run's status, time and load average go to
# /tmp/load5.txt. The figures of record are in bench/RESULTS.md ("The test suite").
set -u
repo=$(cd "$(dirname "$0")/.." && pwd)
rm -rf /tmp/load /tmp/load5.la.* && git clone -q "$repo" /tmp/load && cd /tmp/load
echo "commit $(git rev-parse --short HEAD) $(date -u +%FT%TZ) cpus $(nproc) $(grep -m1 'model name' /proc/cpuinfo)" > /tmp/load5.txt
python3 -c "while True: pass" & hog=$!
for i in 1 2 3 4 5; do
  start=$(date +%s)
  ( while true; do cat /proc/loadavg | cut -d' ' -f1 >> /tmp/load5.la.$i; sleep 10; done ) & sampler=$!
  bash .ci/run > /tmp/load5.run.$i 2>&1; rc=$?
  kill $sampler
  end=$(date +%s)
  la=$(sort -n /tmp/load5.la.$i | sed -n '1p;$p' | tr '\n' ' ')
  echo "run $i rc=$rc seconds=$((end-start)) load(min,max)=$la $(tail -1 /tmp/load5.run.$i)" >> /tmp/load5.txt
done
kill $hog
echo done >> /tmp/load5.txt
