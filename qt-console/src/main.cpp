// SPDX-License-Identifier: LGPL-2.1-or-later
// otp-console: the operator console. Services come from the command line, else from the
// last run (QSettings).
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
  QStringList gateways = parser.values(gateway);
  QStringList transfers = parser.values(transfer);
  if (gateways.isEmpty() && transfers.isEmpty()) {
    gateways = settings.value("gateways").toStringList();
    transfers = settings.value("transfers").toStringList();
  }
  if (gateways.isEmpty() && transfers.isEmpty()) {
    qCritical(
        "otp-console: no services: give --gateway URL and/or --transfer URL (they are "
        "remembered for the next start)");
    return 2;
  }
  for (const auto& list : {gateways, transfers}) {
    for (const auto& text : list) {
      const QUrl url(text);
      if (!url.isValid() || url.scheme() != "http" || url.host().isEmpty()) {
        qCritical("otp-console: %s is not a service URL such as http://127.0.0.1:48080",
                  qPrintable(text));
        return 2;
      }
    }
  }
  settings.setValue("gateways", gateways);
  settings.setValue("transfers", transfers);

  otpgate::console::MainWindow window;
  for (const auto& g : gateways)
    window.add_service(otpgate::console::ServicePoller::Kind::gateway, QUrl(g));
  for (const auto& t : transfers)
    window.add_service(otpgate::console::ServicePoller::Kind::transfer, QUrl(t));
  window.show();
  if (parser.isSet(screenshot)) {
    QTimer::singleShot(int(parser.value(after).toDouble() * 1000), &window, [&] {
      const bool saved = window.grab().save(parser.value(screenshot));
      if (!saved) qCritical("otp-console: cannot write %s", qPrintable(parser.value(screenshot)));
      QApplication::exit(saved ? 0 : 1);
    });
  }
  return app.exec();
}
