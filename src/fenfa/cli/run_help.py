"""``fenfa run --help``: written for the person at the terminal, not the module's reader."""

from __future__ import annotations

USAGE = "usage: fenfa run [OPTIONS] COMMAND [::: ARGS... | :::: FILE...]  (fenfa run --help)"

HELP = """\
usage: fenfa run [OPTIONS] COMMAND [::: ARG... | :::: FILE...] ...
       producer | fenfa run [OPTIONS] COMMAND
       producer | fenfa run --pipe [OPTIONS] COMMAND

Run COMMAND once per input, several at a time, like GNU parallel: the
outputs of a job are printed whole when it ends, a crash can be resumed
without running anything twice, and an input is always one argument (a file
named '$(rm -rf ~)' is never run as a command, whatever the quoting).

Inputs:
  ::: A B C           these arguments          :::: FILE    one input per line
  ::: A B ::: X Y     every combination: A X, A Y, B X, B Y
  ::: A B :::+ X Y    side by side: A X, B Y   ::::+ FILE   the same, from a file
  (nothing)           one input per line of stdin
  Options go before COMMAND; after ::: everything is input.

In COMMAND:
  {}  the input        {.}  without extension   {/}  base name   {//}  directory
  {/.} base name without extension   {#} job number   {%} job slot (1..-j)
  {1} {2} ...  the first, second ... input source (or column, or input of the job)
  {name}       the column named so by --header :
  With none of these, the input is appended.

Options:
  -j, --jobs N          jobs at once: N, +N / -N (cores plus / minus N), N% (of the
                        cores); 0: one per input, at most 256 (default: the cores)
  -k, --keep-order      print outputs in input order (streamed)
  -n, --max-args N      N inputs per job ({1}..{N} within the job; {}: all of them)
  -N N                  the same; -N 0 runs the command once per input, without it
  -X                    as many inputs per job as fit, the word around {} repeated
  -m                    as many inputs per job as fit, {} replaced by all of them
  -L, --max-lines N     N inputs per job, as -X
  -a, --arg-file FILE   inputs from FILE (as :::: FILE); several are combined
  -d, --delimiter D     inputs end at D, not at a newline (\\n \\t \\0 understood)
  -0, --null            inputs end at a NUL byte (find -print0)
  -C, --colsep REGEX    split each input into columns {1} {2} ...; {} stays whole
  --csv                 columns are CSV fields
  --header :            the first input of each source names it: {name}
  -q, --quote           quote COMMAND's words: ; | * $ in them are not shell syntax
  --timeout S           stop a job after S seconds (its whole process group), with
  --termseq SEQ         ... signals and waits in ms (default TERM,200,TERM,100,
                        TERM,50,KILL,25, as GNU parallel)
  --retries N           run a failing job up to N times in all (as GNU parallel;
                        0: until it succeeds)
  --halt WHEN,WHAT=N    stop after N jobs failed / succeeded / finished (fail, success,
                        done); WHEN: now (kill the running jobs) or soon (let them end)
  --shell SHELL         the shell for commands with shell syntax (default: as GNU
                        parallel, $PARALLEL_SHELL, the calling shell, $SHELL, /bin/sh)
  --joblog FILE         GNU parallel's tab-separated log, plus Attempt and Key columns
  --resume              skip the jobs the journal records as done (with --results
                        DIR: read from --joblog FILE)
  --resume-failed       ... and run again those that failed
  --dry-run             print the commands, run nothing
  --bar                 a progress bar on stderr
  -h, --help            this text

Output:
  --tag                 each line of a job's output starts with its inputs and a TAB
  --tagstring STR       ... with STR instead ({} {1} {#} ... replaced)
  --line-buffer, --lb   print each line as it comes (lines never torn; with -k the
                        oldest job's lines first, the others' held until their turn)
  -u, --ungroup         the jobs write to the terminal directly (lines may be torn)
  --results DIR/        each job's stdout, stderr, seq in GNU parallel's layout
                        (DIR/1/INPUT/stdout; nothing printed): an existing
                        directory, or a name ending in /
  --results FILE        otherwise: one JSON record per finished job (input, command,
                        exit, signal, stdout, stderr, start, duration, attempt, key)
  --eta, --progress     a progress bar with the time left on stderr (as --bar)

--pipe (stdin cut into blocks of whole records, each block one job's stdin):
  --block SIZE          blocks of at most SIZE bytes (default 1M; k=1000, K=1024, M G T)
  -N N                  N records a block, whatever their size
  --recend STR          a record ends with STR (default: a newline)
  --recstart STR        ... and the next starts with STR (given alone: --recend '')
  --pipe-part -a FILE   the same from a seekable FILE, cut near every --block bytes

Starting jobs:
  --delay S             at least S seconds between two job starts (3s, 2m, 1h)
  --load N              start no job while the 1-minute load average is above N
                        (N, +N, -N, N% of the cores, as -j: 100% = one per core)
  --memfree SIZE        start no job while less than SIZE memory is free; below half
                        of it, the youngest job is stopped and run again later (not
                        counted as a retry; the last running job is never stopped)
  --wd DIR              run the jobs in DIR
  --env VAR             accepted for GNU parallel's command lines: local jobs get the
                        whole environment anyway

A journal (--joblog, --results) is appended to only if it is new, empty, or
already one of its kind; anything else is refused. New ones are created 0600.

On a Dask cluster (docs/dask.md), -j being the jobs in flight across it:
  --backend dask        run each job's command on a dask worker (local: here)
  --address ADDR        its scheduler, tcp://HOST:PORT (default: $DASK_SCHEDULER_ADDRESS)

Examples:
  fenfa run -j 4 'convert {} {.}.png' ::: *.jpg
  find . -name '*.log' -print0 | fenfa run -0 -X gzip
  zcat big.csv.gz | fenfa run --pipe --block 10M ./load.sh    # blocks on stdin
  fenfa run --joblog jobs.log --timeout 60 --retries 3 ./process.sh :::: todo.txt
      (killed? the same command with --resume after --joblog jobs.log: what
      finished is skipped, nothing runs twice)

Exit status:
  0      every job succeeded
  1-100  the number of jobs that failed
  101    more than 100 failed
  255    bad usage (one line on stderr), nothing was run
  With --halt ...,fail=1: the failing job's exit status; ...,success=N: 0.
"""
