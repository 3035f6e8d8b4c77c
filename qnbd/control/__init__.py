"""The control socket (issue 15): live changes to a running server, and what it reports.
`protocol` is the wire format (sans-I/O), `handlers` runs the commands, `bitmaps` the
persistent bitmap operations on a live export, `service` the asyncio side, `client` what
`qnbd ctl` speaks."""
