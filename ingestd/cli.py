"""The `ingestd` command: run, status, import, explain, anonymize, retry, release and the other tools."""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import sys
import time
from pathlib import Path

from ingestd import __version__
from ingestd.config import Config, load_config
from ingestd.errors import ConfigError, IngestdError
from ingestd.journal import Journal
from ingestd.states import StudyState

__all__ = ["main"]

DEFAULT_CONFIG = Path("/etc/ingestd/ingestd.yaml")


def _parser() -> argparse.ArgumentParser:  # noqa: PLR0915 - one block per command
    parser = argparse.ArgumentParser(prog="ingestd", description="DICOM ingestion daemon for research labs.")
    parser.add_argument("--version", action="version", version=f"ingestd {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run the daemon until SIGTERM or SIGINT")
    run.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help=f"configuration file ({DEFAULT_CONFIG})")

    check = commands.add_parser(
        "check-config",
        help="check a configuration and every file, folder and credential source it names; exit 2 on an error",
    )
    check.add_argument("file", type=Path)
    check.add_argument("--rules", action="store_true", help="also check its rules files, as check-rules does")

    check_rules = commands.add_parser("check-rules", help="validate rules files (together, as the daemon loads them)")
    check_rules.add_argument("files", type=Path, nargs="+", metavar="FILE")

    new_key = commands.add_parser("new-key", help="write a new random key to a new file of mode 0600")
    new_key.add_argument("file", type=Path)

    password = commands.add_parser(
        "ui-password",
        help="set a user's password for the web page in ui.password_file (asked twice; or the first line of stdin)",
    )
    password.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help=f"configuration file ({DEFAULT_CONFIG})")
    password.add_argument("user", metavar="USER")

    explain = commands.add_parser(
        "explain",
        help="show which rule matches DICOM files or a spooled study, its labels, and what the profile does to each"
        " attribute",
    )
    explain.add_argument(
        "--rules", type=Path, action="append", metavar="FILE", help="rules file(s) (with --config: instead of its own)"
    )
    explain.add_argument(
        "--config",
        type=Path,
        help=f"explain studies in this configuration's spool, named by batch id, digest or UID (without --rules:"
        f" {DEFAULT_CONFIG})",
    )
    explain.add_argument(
        "paths", nargs="+", metavar="PATH|BATCH", help="DICOM files or folders (with --rules); spooled batches"
    )
    explain.add_argument("--calling-aet", help="treat the files as received over DICOM from this AE title")
    explain.add_argument("--called-aet", default="INGESTD", help="the AE title they were sent to (default INGESTD)")
    explain.add_argument("--all", action="store_true", help="show every instance, not one per series")

    anonymize = commands.add_parser(
        "anonymize", help="de-identify files or folders offline, exactly as the daemon would, into a folder"
    )
    anonymize.add_argument("--rules", type=Path, action="append", required=True, metavar="FILE", help="rules file(s)")
    anonymize.add_argument("--rule", help="apply this rule whatever its `when` says (default: the first that matches)")
    anonymize.add_argument("--calling-aet", help="treat the files as received over DICOM from this AE title")
    anonymize.add_argument("--called-aet", default="INGESTD", help="the AE title they were sent to (default INGESTD)")
    anonymize.add_argument("input", type=Path, help="a DICOM file or a folder")
    anonymize.add_argument("output", type=Path, help="the folder to write into (<study>/<series>/<instance>.dcm)")

    demo_help = "start an XNAT stand-in and the daemon, send a study, show it arrive de-identified (~10 s)"
    demo = commands.add_parser("demo", help=demo_help, description=demo_help[0].upper() + demo_help[1:] + ".")
    demo.add_argument(
        "--keep",
        type=Path,
        metavar="FOLDER",
        help="work in FOLDER and keep it (default: a temp folder): FOLDER/ingestd.yaml then runs as it is, with the"
        " stand-in the demo says how to start",
    )
    demo.add_argument(
        "--ui",
        action="store_true",
        help="the web page's walk-through: an MR study archived, a CT study held until you fix the rule and press"
        " Retry on the page; runs until Ctrl-C",
    )
    demo.add_argument(
        "--port", type=int, default=9471, help="with --ui: the web page's port on 127.0.0.1 (default 9471; 0: any)"
    )

    health = commands.add_parser(
        "health", help="is the daemon running and answering? (exit 0 or 1; for HEALTHCHECK and monitoring)"
    )
    health.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help=f"configuration file ({DEFAULT_CONFIG})")
    health.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the C-ECHO (default 5)")

    retry = commands.add_parser(
        "retry",
        help="route held studies again with the rules as they are now (a running daemon reloads first); --now: try"
        " waiting ones at once",
        description="Route held studies again with the rules and credentials as they are now: a running daemon is"
        " sent SIGHUP first and retry waits until it has reloaded. A study part of which may already be in XNAT"
        " keeps its route, and retry says what to remove in XNAT before --reroute-sent.",
    )
    retry.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help=f"configuration file ({DEFAULT_CONFIG})")
    which = retry.add_mutually_exclusive_group()
    which.add_argument("study", nargs="?", help="batch id (12, #12), study digest (sha256:...), or Study Instance UID")
    which.add_argument("--held", action="store_true", help="every held study")
    which.add_argument("--all", action="store_true", help="with --now: every waiting study (the default for --now)")
    retry.add_argument(
        "--now",
        action="store_true",
        help="also try at once what waits between attempts (deliveries, retries after a failure, paused XNAT logins)",
    )
    route = retry.add_mutually_exclusive_group()
    route.add_argument(
        "--keep-route", action="store_true", help="keep the route it has (no re-routing): after fixing XNAT, not rules"
    )
    route.add_argument(
        "--reroute-sent",
        action="store_true",
        help="re-route even a study part of which may be in XNAT already (remove that in XNAT first: retry says what)",
    )
    retry.add_argument(
        "--wait", type=float, default=60.0, metavar="SECONDS", help="how long to wait for the daemon to reload (60)"
    )

    release = commands.add_parser("release", help="take a held study over by hand: ingestd stops working on it")
    release.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help=f"configuration file ({DEFAULT_CONFIG})")
    release.add_argument("study", help="batch id, study digest (sha256:...), or Study Instance UID")

    unrelease = commands.add_parser(
        "unrelease", help="take a release back: the study is held again, with its reason, for `ingestd retry`"
    )
    unrelease.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help=f"configuration file ({DEFAULT_CONFIG})")
    unrelease.add_argument("study", help="batch id, study digest (sha256:...), or Study Instance UID")

    resend = commands.add_parser(
        "resend",
        help="send a delivered study again, as a new batch, from the copies kept by delivery.keep_after_delivery",
    )
    resend.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help=f"configuration file ({DEFAULT_CONFIG})")
    resend.add_argument("study", help="batch id, study digest (sha256:...), or Study Instance UID")
    resend.add_argument(
        "--route",
        metavar="RULE",
        help="route it by this rule, whatever its `when` says (default: the rule that delivered it)",
    )

    bulk = commands.add_parser(
        "import",
        help="take folders, files and archives on disk to XNAT as the daemon would; wait until delivered or held",
    )
    bulk.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help=f"configuration file ({DEFAULT_CONFIG})")
    bulk.add_argument(
        "--rules", type=Path, action="append", metavar="FILE", help="rules file(s) instead of the configuration's"
    )
    bulk.add_argument("--dry-run", action="store_true", help="print what would happen to each study; write nothing")
    bulk.add_argument(
        "--show-paths", action="store_true", help="name quarantined files by their path (default: a digest)"
    )
    bulk.add_argument("paths", type=Path, nargs="+", metavar="PATH", help="DICOM files, folders, zip or tar archives")

    check_xnat = commands.add_parser(
        "check-xnat",
        help="log in to each XNAT server as the daemon would and check the account, projects and settings",
    )
    check_xnat.add_argument(
        "--config", type=Path, default=DEFAULT_CONFIG, help=f"configuration file ({DEFAULT_CONFIG})"
    )
    check_xnat.add_argument("server", nargs="?", metavar="SERVER", help="only this server (default: every server)")
    check_xnat.add_argument(
        "--write-test",
        metavar="PROJECT",
        help="also import a tiny generated study into PROJECT's prearchive, check it and delete it",
    )
    check_xnat.add_argument("--json", action="store_true", help="print JSON for scripts")

    purge = commands.add_parser(
        "purge", help="remove what retention: says ingestd is done with (the daemon does it every check interval)"
    )
    purge.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help=f"configuration file ({DEFAULT_CONFIG})")
    purge.add_argument("--dry-run", action="store_true", help="print what would be removed; remove nothing")

    status = commands.add_parser("status", help="list studies and quarantined items from the journal")
    status.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help=f"configuration file ({DEFAULT_CONFIG})")
    status.add_argument("--json", action="store_true", help="print JSON for scripts (every field)")
    status.add_argument("--wide", action="store_true", help="every column of a study on one line, however long")
    status.add_argument(
        "--filter",
        action="append",
        metavar="KEY=VALUE[,KEY=VALUE]",
        help="only these studies; keys: state, reason (hold code), source, rule, modality, kind (dicom, files),"
        " older-than, newer-than (an age: 30m, 2h, 3d); e.g. --filter state=held,reason=unrouted",
    )
    status.add_argument(
        "--show-uids",
        action="store_true",
        help="show original Study Instance UIDs (default: a digest, or the new UID) and labels built from identifying"
        " values (default: the logs' digests)",
    )
    status.add_argument(
        "--show-paths",
        action="store_true",
        help="show where quarantined items came from (their original paths, which may hold patient names)",
    )
    return parser


def _cmd_run(path: Path) -> int:
    from ingestd.admin.checkconfig import check_config, log_warnings  # noqa: PLC0415
    from ingestd.daemon import Daemon  # noqa: PLC0415 - keeps `status` and `check-config` light
    from ingestd.logs import configure_logging  # noqa: PLC0415

    report = check_config(path)  # what `check-config` calls an error refuses the start, all of it at once
    if report.errors or report.config is None:
        refused = f"ingestd: not started: fix the above (ingestd check-config {path})"
        raise ConfigError(str(path), [*report.errors, refused])
    config = report.config
    configure_logging(config.logging.level, config.logging.format)
    log_warnings(report.warnings)
    # A fatal signal (systemd's watchdog sends SIGABRT to a daemon whose main loop hangs) writes every thread's
    # stack to stderr first: where it hung, in the journal.
    faulthandler.enable(all_threads=True)
    daemon = Daemon(config, path)
    status = daemon.run()
    if daemon.abandoned:
        # A service outlived the stop deadline (an XNAT request, say): end now, as the deadline promises, rather
        # than in the interpreter's exit, which would wait for it. The journal resumes its work at the next start.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    return status


def _cmd_offline(args: argparse.Namespace) -> int:
    import tempfile  # noqa: PLC0415

    from ingestd.logs import quiet_pydicom  # noqa: PLC0415
    from ingestd.offline import anonymize_studies, explain_studies, read_studies, studies_at_hand  # noqa: PLC0415
    from ingestd.pipeline.attachplan import FileAtHand, plan_attachments  # noqa: PLC0415
    from ingestd.rules import load_rules  # noqa: PLC0415
    from ingestd.rules.attach import attachable  # noqa: PLC0415

    quiet_pydicom()
    rules = load_rules(args.rules)
    paths = [Path(path) for path in args.paths] if args.command == "explain" else [args.input]
    missing = [path for path in paths if not path.exists()]
    if missing:
        print(f"ingestd: no such file or folder: {missing[0]}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="ingestd-") as scratch:  # the instances as the spool would hold them
        attached: list[FileAtHand] = []
        explaining = args.command == "explain"
        studies, skipped = read_studies(
            paths,
            Path(scratch),
            calling_aet=args.calling_aet,
            called_aet=args.called_aet,
            attachable=(lambda relative: attachable(rules, relative)) if explaining else None,
            attachments=attached,
        )
        for path, reason in skipped:
            print(f"skipped {path}: {reason}", file=sys.stderr)
        if not studies and not attached:
            print("ingestd: no DICOM instances found", file=sys.stderr)
            return 1
        if explaining:
            for line in explain_studies(rules, studies, all_instances=args.all):
                print(line)
            plan = plan_attachments(rules, attached, studies_at_hand(rules, studies), show_paths=True)
            for line, _held in plan:  # paths shown: `explain` is for the operator's terminal
                print(line)
            return 0
        failed = 0
        for message, ok in anonymize_studies(rules, studies, args.output, rule=args.rule):
            print(message, file=sys.stdout if ok else sys.stderr)
            failed += not ok
        return 1 if failed else 0


def _cmd_import(args: argparse.Namespace, config: Config) -> int:
    from ingestd.bulk import run_import  # noqa: PLC0415 - pulls in the router, the deliverer and tqdm
    from ingestd.logs import configure_logging  # noqa: PLC0415

    configure_logging(config.logging.level, config.logging.format)
    return run_import(
        config,
        args.paths,
        rules_files=args.rules or (),
        dry_run=args.dry_run,
        show_paths=args.show_paths,
        config_name=str(args.config),
    )


def _cmd_release(args: argparse.Namespace, config: Config) -> int:
    from ingestd.admin.batchref import find_batches  # noqa: PLC0415 - keeps `status` light

    if not config.journal_path.exists():
        print(f"ingestd: no journal at {config.journal_path}", file=sys.stderr)
        return 1
    journal = Journal(config.journal_path)
    try:
        batches = find_batches(journal, args.study, (StudyState.HELD,))
        if not batches:
            print("ingestd: no held study matches", file=sys.stderr)
            return 1
        now = time.time()
        for batch_id in batches:
            print(f"batch {batch_id}: {'released' if journal.release_batch(batch_id, now) else 'not held'}")
    finally:
        journal.close()
    return 0


def _cmd_retry(args: argparse.Namespace, config: Config) -> int:
    from ingestd.admin.retry import RetryRequest, run_retry  # noqa: PLC0415 - loads the rules

    fields = ("study", "held", "all", "now", "keep_route", "reroute_sent")
    return run_retry(config, RetryRequest(**{name: getattr(args, name) for name in fields}, wait_seconds=args.wait))


def _daemon_running(config: Config) -> bool:
    """Whether a daemon (or an import working without one) holds the state directory's lock."""
    from ingestd.statedir import lock_holder  # noqa: PLC0415 - keeps `status` light

    return lock_holder(config.state_dir) is not None


def _cmd_check_rules(files: list[Path]) -> int:
    from ingestd.rules import load_rules  # noqa: PLC0415 - keeps `status` light
    from ingestd.rules.shadow import shadowed_rules  # noqa: PLC0415 - keeps `status` light

    rules = load_rules(files)
    for file in files:
        count = sum(1 for rule in rules.rules if rule.source == file)
        profiles = sum(1 for source in rules.profile_sources.values() if source == file)
        print(
            f"{file}: OK ({count} rule{'' if count == 1 else 's'}, {profiles} profile{'' if profiles == 1 else 's'};"
            f" rule set {rules.version})"
        )
    for rule in rules.rules:
        for label, field in rule.identifying_labels:
            if field in ("project", "subject"):
                continue  # the label it repeats is warned about
            print(
                f"{rule.origin}: warning: rule '{rule.name}' does not anonymize, and its route.{label} holds "
                f"{{{field}}} as it is: XNAT gets the original value, the logs a digest of it; use "
                f"{{{field.split('[')[0]}:hash8}} with route.key (or anonymize) to keep it out of XNAT",
                file=sys.stderr,
            )
    for shadowed in shadowed_rules(rules):
        print(shadowed.message, file=sys.stderr)
    return 0


def _cmd_check_xnat(args: argparse.Namespace, config: Config) -> int:
    """Exit 0 when every check is ok, 1 with a warning, 2 with an error (or a configuration error)."""
    from ingestd.check_xnat import check_xnat, exit_status, iter_lines  # noqa: PLC0415 - pulls in requests, rules

    try:
        findings = check_xnat(config, args.server, write_test=args.write_test)
    except ConfigError:
        raise
    except IngestdError as exc:  # the rules do not load, say: not a finding, but a refusal to check
        print(f"ingestd: {exc}", file=sys.stderr)
        return 2
    status = exit_status(findings)
    if args.json:
        json.dump({"status": status, "findings": [finding.as_dict() for finding in findings]}, sys.stdout, indent=2)
        print()
    else:
        for line in iter_lines(findings):
            print(line)
    return status


def _cmd_new_key(file: Path) -> int:
    from ingestd.rules import write_new_key  # noqa: PLC0415

    write_new_key(file)
    print(f"wrote a new key to {file} (mode 0600); use it in a profile as key: {{file: {file}}}")
    return 0


EXIT_PIPE_CLOSED = 141  # 128 + SIGPIPE: what a shell reports for a command whose reader went away (`| head`)


def main(argv: list[str] | None = None) -> int:
    """Run the `ingestd` command; return the exit status.

    Output into a pipe that closed early (`ingestd status | head -1`) ends the command quietly, as the Python
    documentation recommends (signal.html, "Note on SIGPIPE"): the standard streams are pointed at /dev/null, so
    that the flush at exit fails no more, and the exit status is a closed pipe's.
    """
    try:
        try:
            status = _command(argv)
        finally:  # also after --help or a usage error (SystemExit): a closed pipe shows here, not at exit
            sys.stdout.flush()
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        for stream in (sys.stdout, sys.stderr):
            try:
                os.dup2(devnull, stream.fileno())
            except (OSError, ValueError):  # a stream without a file descriptor (a test's StringIO)
                continue
        os.close(devnull)
        return EXIT_PIPE_CLOSED
    return status


def _command(argv: list[str] | None) -> int:  # noqa: PLR0911, PLR0912 - one branch and return per command
    """Parse the arguments and run one command; its exit status."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "check-config":
            from ingestd.admin.checkconfig import print_report  # noqa: PLC0415 - reads credentials, rules

            return print_report(args.file, _cmd_check_rules if args.rules else None)
        if args.command == "run":
            return _cmd_run(args.config)
        if args.command == "check-rules":
            return _cmd_check_rules(args.files)
        if args.command == "new-key":
            return _cmd_new_key(args.file)
        if args.command == "ui-password":
            from ingestd.ui.passwords import run_ui_password  # noqa: PLC0415 - only for this command

            return run_ui_password(args.config, args.user)
        if args.command == "explain" and (args.config is not None or not args.rules):
            from ingestd.offline import run_explain_batches  # noqa: PLC0415 - reads the spool and the rules

            return run_explain_batches(
                args.config,
                args.paths,
                default_config=DEFAULT_CONFIG,
                rules=args.rules,
                calling_aet=args.calling_aet,
                every=args.all,
            )
        if args.command in ("explain", "anonymize"):
            return _cmd_offline(args)
        if args.command == "demo":
            from ingestd.demo import run_demo  # noqa: PLC0415 - starts servers; only for this command

            if args.ui:
                from ingestd.demo_ui import run_demo_ui  # noqa: PLC0415 - starts servers; only for this command

                return run_demo_ui(args.keep, args.port)
            return run_demo(args.keep)
        config = load_config(args.config)
        if args.command == "health":
            from ingestd.admin.health import print_health  # noqa: PLC0415 - pulls in pynetdicom

            return print_health(config, args.timeout)
        if args.command == "retry":
            return _cmd_retry(args, config)
        if args.command == "release":
            return _cmd_release(args, config)
        if args.command in ("unrelease", "resend"):
            from ingestd.admin.resend import run_command  # noqa: PLC0415 - loads the rules; only for these commands

            return run_command(args.command, config, args.study, getattr(args, "route", None))
        if args.command == "import":
            return _cmd_import(args, config)
        if args.command == "purge":
            from ingestd.admin.purge import run_purge  # noqa: PLC0415

            return run_purge(config, dry_run=args.dry_run, running=_daemon_running(config))
        if args.command == "check-xnat":
            return _cmd_check_xnat(args, config)
        from ingestd.admin.statusview import show_status  # noqa: PLC0415 - only for this command

        return show_status(
            config,
            running=_daemon_running(config),
            as_json=args.json,
            wide=args.wide,
            show_uids=args.show_uids,
            show_paths=args.show_paths,
            filters=args.filter or (),
        )
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return 2
    except IngestdError as exc:
        print(f"ingestd: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
