from watibot.cli import main

raise SystemExit(main())
