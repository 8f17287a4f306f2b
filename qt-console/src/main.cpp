// SPDX-License-Identifier: LGPL-2.1-or-later
// otp-console: the operator console. Services come from the command line, else from the
// last run (QSettings), else from the services dialog a first start opens.
#include <QApplication>
#include <QCommandLineParser>
#include <QSettings>
#include <QTimer>

#include "main_window.hpp"

int main(int argc, char** argv) {
  QApplication app(argc, argv);
  QApplication::setOrganizationName("otpgate");
  QApplication::setApplicationName("otp-console");
  QCommandLineParser parser;
  parser.setApplicationDescription(
      "Operator console for otpgate: key levels and consumption per key supply, streams, "
      "specimen transfers and alerts, read from the gateways' and transfer services' HTTP APIs.");
  parser.addHelpOption();
  QCommandLineOption gateway({"g", "gateway"},
                             "A gateway's status API, e.g. http://127.0.0.1:48080 (repeat)", "url");
  QCommandLineOption transfer({"t", "transfer"},
                              "A transfer service's job API, e.g. http://127.0.0.1:47481 (repeat)",
                              "url");
  QCommandLineOption screenshot("screenshot",
                                "Save a PNG of the window after --after seconds, then exit "
                                "(for reports; works with QT_QPA_PLATFORM=offscreen)",
                                "file");
  QCommandLineOption after("after", "Seconds before --screenshot (default 10)", "seconds", "10");
  parser.addOption(gateway);
  parser.addOption(transfer);
  parser.addOption(screenshot);
  parser.addOption(after);
  parser.process(app);

  QSettings settings;
  otpgate::console::MainWindow window;
  QStringList given = parser.values(gateway) + parser.values(transfer);
  for (const auto& text : given) {
    if (const QString problem = otpgate::console::url_problem(text); !problem.isEmpty()) {
      qCritical("otp-console: %s", qPrintable(problem));
      return 2;
    }
  }
  if (!given.isEmpty()) {  // the command line's services, remembered for the next start
    QList<otpgate::console::ServiceEntry> services;
    for (const auto& g : parser.values(gateway))
      services << otpgate::console::ServiceEntry{
          otpgate::console::ServicePoller::Kind::gateway, QUrl(g), {}, {}};
    for (const auto& t : parser.values(transfer))
      services << otpgate::console::ServiceEntry{
          otpgate::console::ServicePoller::Kind::transfer, QUrl(t), {}, {}};
    otpgate::console::save_services(settings, services);
  }
  // Without any service yet (a first start from the desktop menu) the window opens with
  // the services dialog over it.
  window.show();
  window.start_from(&settings);
  if (parser.isSet(screenshot)) {
    QTimer::singleShot(int(parser.value(after).toDouble() * 1000), &window, [&] {
      const bool saved = window.grab().save(parser.value(screenshot));
      if (!saved) qCritical("otp-console: cannot write %s", qPrintable(parser.value(screenshot)));
      QApplication::exit(saved ? 0 : 1);
    });
  }
  return app.exec();
}
