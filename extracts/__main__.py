from extracts.cli import main

raise SystemExit(main())
