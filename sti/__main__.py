from sti.cli import main

raise SystemExit(main())
